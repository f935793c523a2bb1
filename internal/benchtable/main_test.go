package main

import (
	"strings"
	"testing"
)

// Runs made side by side are compared pairwise: a machine that slows down
// between runs moves both sides of a pair, so the ratio is that of the runs,
// not of the two medians.
func TestRatioPairsRuns(t *testing.T) {
	rs := parse(strings.NewReader(`
BenchmarkHotPath/baseline-maphash64-2   1000  100 ns/op  0 B/op  0 allocs/op
BenchmarkHotPath/ours-2                 1000  150 ns/op  18 B/op  0 allocs/op
BenchmarkHotPath/baseline-maphash64-2   1000  200 ns/op  0 B/op  0 allocs/op
BenchmarkHotPath/ours-2                 1000  300 ns/op  18 B/op  0 allocs/op
BenchmarkHotPath/baseline-maphash64-2   1000  400 ns/op  0 B/op  0 allocs/op
BenchmarkHotPath/ours-2                 1000  100 ns/op  18 B/op  0 allocs/op
`))
	if len(rs) != 2 {
		t.Fatalf("parsed %d benchmarks, want 2", len(rs))
	}
	base, ours := rs[0], rs[1]
	if base.procs != 2 || ours.metrics["B/op"] != 18 {
		t.Fatalf("parsed %+v", rs)
	}
	if got := ours.metrics["ns/op"]; got != 150 {
		t.Errorf("median ns/op = %v, want 150", got)
	}
	// Run ratios 1.5, 1.5, 0.25: median 1.5 (the ratio of medians would be 0.75).
	if got := ratio(ours, base); got != 1.5 {
		t.Errorf("ratio = %v, want 1.5", got)
	}
}

// A ratio over several side-by-side runs shows its range, so that a verdict
// such as "faster than puddle" can be read against the runs that contradict it.
func TestSpreadShowsTheRangeOfRunRatios(t *testing.T) {
	rs := parse(strings.NewReader(`
BenchmarkSpread/base   1000  100 ns/op
BenchmarkSpread/ours   1000   90 ns/op
BenchmarkSpread/base   1000  100 ns/op
BenchmarkSpread/ours   1000  120 ns/op
BenchmarkSpread/base   1000  200 ns/op
BenchmarkSpread/ours   1000  200 ns/op
BenchmarkSpread/once   1000  300 ns/op
`))
	if got, want := spread(rs[1], rs[0], " base"), "1.00× base (0.90–1.20)"; got != want {
		t.Errorf("spread = %q, want %q", got, want)
	}
	if got, want := spread(rs[2], rs[0], ""), "3.00×"; got != want {
		t.Errorf("spread of a single run = %q, want %q", got, want)
	}
}

// The warm-path target is read as a fraction of its budget, 1.5 GETs plus
// the provider call, run by run.
func TestBudgetIsWarmOverOneAndAHalfGETsPlusTheCall(t *testing.T) {
	rs := parse(strings.NewReader(`
BenchmarkBudget/get    1000  100 ns/op
BenchmarkBudget/call   1000  100 ns/op
BenchmarkBudget/warm   1000  250 ns/op
BenchmarkBudget/get    1000  300 ns/op
BenchmarkBudget/call   1000  100 ns/op
BenchmarkBudget/warm   1000  660 ns/op
BenchmarkBudget/get    1000  100 ns/op
BenchmarkBudget/call   1000  100 ns/op
BenchmarkBudget/warm   1000  200 ns/op
`))
	// Runs: 250/250 = 1.00, 660/550 = 1.20, 200/250 = 0.80.
	if got, want := budget(rs[2], rs[0], rs[1]), "1.00 of the budget 1.5×GET + Connect (0.80–1.20)"; got != want {
		t.Errorf("budget = %q, want %q", got, want)
	}
}
