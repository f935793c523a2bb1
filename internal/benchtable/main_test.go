package main

import (
	"math"
	"os"
	"path/filepath"
	"slices"
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
// the provider call, run by run: with the call timed alone, or timed after a
// GET (which then counts one of the 1.5 GETs).
func TestBudgetIsWarmOverOneAndAHalfGETsPlusTheCall(t *testing.T) {
	rs := parse(strings.NewReader(`
BenchmarkBudget/get    1000  100 ns/op
BenchmarkBudget/call   1000  100 ns/op
BenchmarkBudget/seq    1000  300 ns/op
BenchmarkBudget/warm   1000  250 ns/op
BenchmarkBudget/get    1000  300 ns/op
BenchmarkBudget/call   1000  100 ns/op
BenchmarkBudget/seq    1000  500 ns/op
BenchmarkBudget/warm   1000  660 ns/op
BenchmarkBudget/get    1000  100 ns/op
BenchmarkBudget/call   1000  100 ns/op
BenchmarkBudget/seq    1000  150 ns/op
BenchmarkBudget/warm   1000  200 ns/op
`))
	for _, c := range []struct {
		name          string
		call          result
		k             float64
		med, lo, hi   float64
		runsExplained string
	}{
		{"call alone", rs[1], 1.5, 1.00, 0.80, 1.20, "250/250, 660/550, 200/250"},
		{"call after a GET", rs[2], 0.5, 1.00, 0.71, 1.02, "250/350, 660/650, 200/200"},
	} {
		med, lo, hi, ok := budget(rs[3], rs[0], c.call, c.k)
		if near := func(a, b float64) bool { return math.Abs(a-b) < 0.005 }; !ok || !near(med, c.med) || !near(lo, c.lo) || !near(hi, c.hi) {
			t.Errorf("%s: budget = %.2f (%.2f–%.2f), %v; want %.2f (%.2f–%.2f) from runs %s", c.name, med, lo, hi, ok, c.med, c.lo, c.hi, c.runsExplained)
		}
	}
	if _, _, _, ok := budget(rs[3], rs[0], result{name: "Budget/absent", procs: 1}, 1.5); ok {
		t.Error("budget with a reference that never ran reported a figure")
	}
}

// A warm row that carries the split of its time reports the pool's own time
// as a fraction of the GET of the same run, the median and range over runs.
func TestWarmRowsSplitTheirTime(t *testing.T) {
	var out strings.Builder
	table(&out, parse(strings.NewReader(`
BenchmarkRedisPaths/baseline-GET-2      1000  20000 ns/op
BenchmarkRedisPaths/warm-redis-hit-2    1000  30000 ns/op   20 io-µs/op   10 own-µs/op   1 redis-rt/op
BenchmarkRedisPaths/baseline-GET-2      1000  40000 ns/op
BenchmarkRedisPaths/warm-redis-hit-2    1000  50000 ns/op   38 io-µs/op   12 own-µs/op   1 redis-rt/op
BenchmarkRedisPaths/baseline-GET-2      1000  20000 ns/op
BenchmarkRedisPaths/warm-redis-hit-2    1000  28000 ns/op   19 io-µs/op    9 own-µs/op   1 redis-rt/op
`)))
	want := "1.00 Redis round trips/op; I/O 20.0 µs/op, the pool's own time 10.0 µs/op: 0.45 of a GET (0.30–0.50) |"
	if !strings.Contains(out.String(), want) {
		t.Errorf("table lacks %q (runs 10/20, 12/40, 9/20):\n%s", want, out.String())
	}
}

// Every hot-path group is printed against its own baseline, and the map of
// records is read against puddle too: it is the floor for a pool that must
// touch a record per pair, so its ratio to puddle says what such a pool can
// reach in that group.
func TestTablePrintsEachHotPathGroupAndTheRecordMapAgainstPuddle(t *testing.T) {
	var out strings.Builder
	table(&out, parse(strings.NewReader(`
BenchmarkHotPathArrivalIDs/baseline-maphash64-2            1000   50 ns/op
BenchmarkHotPathArrivalIDs/ref-maphash64-128B-records-2    1000  100 ns/op
BenchmarkHotPathArrivalIDs/sandboxpool-Acquire+Release-2   1000  120 ns/op
BenchmarkHotPathArrivalIDs/puddle-Acquire+Release-2        1000  125 ns/op
`)))
	for _, want := range []string{
		"| HotPathArrivalIDs/baseline-maphash64 | 2 | 50.0 |",
		"| HotPathArrivalIDs/sandboxpool-Acquire+Release | 2 | 120.0 | 0 | 0 | 2.40× | 0.96× puddle/v2; 1.20× the map of 128-byte records |",
		"| HotPathArrivalIDs/ref-maphash64-128B-records | 2 | 100.0 | 0 | 0 | 2.00× | reference: the baseline's map with a 128-byte record per pair, a slot's size; 0.80× puddle/v2 |",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, out.String())
		}
	}
}

// threeHotRuns are three side-by-side runs of the hot path at GOMAXPROCS=2:
// the pool over the bare map 1.5, 2.5 and 1.3 and over puddle 1.07, 1.79
// and 0.93, with one allocation in the second run.
const threeHotRuns = `
BenchmarkHotPath/baseline-maphash64-2            1000  100 ns/op  0 allocs/op
BenchmarkHotPath/sandboxpool-Acquire+Release-2   1000  150 ns/op  0 allocs/op
BenchmarkHotPath/puddle-Acquire+Release-2        1000  140 ns/op  0 allocs/op
BenchmarkHotPath/baseline-maphash64-2            1000  100 ns/op  0 allocs/op
BenchmarkHotPath/sandboxpool-Acquire+Release-2   1000  250 ns/op  1 allocs/op
BenchmarkHotPath/puddle-Acquire+Release-2        1000  140 ns/op  0 allocs/op
BenchmarkHotPath/baseline-maphash64-2            1000  100 ns/op  0 allocs/op
BenchmarkHotPath/sandboxpool-Acquire+Release-2   1000  130 ns/op  0 allocs/op
BenchmarkHotPath/puddle-Acquire+Release-2        1000  140 ns/op  0 allocs/op
`

// The targets are read against every run, not only the medians: a count
// (allocations, creates per pair) breaks its target if any run breaks it,
// and a ratio's verdict is its median's, with the runs that contradict it
// named.
func TestTargetsReadEveryRun(t *testing.T) {
	var out strings.Builder
	targets(&out, parse(strings.NewReader(threeHotRuns+`
BenchmarkContention/1000-goroutines-one-pair-2   1  5 ns/op  1 creates/pair
BenchmarkContention/8-managers-100-pairs-2       1  5 ns/op  0.99 creates/pair
BenchmarkMemoryPerPair-2                         1  5 ns/op  200 B/pair  11 heap-after-churn-%
BenchmarkReaperTickIdle-2                        1000  30 ns/op
`)))
	for _, want := range []string{
		// Runs 1.5, 2.5, 1.3: the median meets ≤ 2×, one run does not.
		"| hot path ≤ 2× the bare map (100k pairs, random order, ids read by pair; GOMAXPROCS=2) | 1.50× (1.30–2.50), met in 2 of 3 runs: not in every run | yes |",
		// Runs 1.07, 1.79, 0.93 against puddle: the median does not meet it;
		// the bare map, 100 ns against 140, is 0.71× puddle.
		"| hot path faster than puddle (100k pairs, random order, ids read by pair; GOMAXPROCS=2) | 1.07× (0.93–1.79), met in 1 of 3 runs; the bare map itself 0.71× puddle | no |",
		"| hot path allocates nothing | 1 allocs/op at most | no |",
		"| contention: creates equal pairs | 0.99–1.00 creates per pair | no |",
		"| ≤ 256 bytes per pooled pair at 1,000,000 pairs | 200.0 B at most | yes |",
		"| heap within 10% of its start after churn | +11.00% at most | no |",
		"| reaper tick < 1 ms with nothing due | 30 ns at most | yes |",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("targets lack %q:\n%s", want, out.String())
		}
	}
	// A target whose benchmark did not run is left out, not reported met.
	for _, absent := range []string{"Redis", "arrival order", "warm path"} {
		if strings.Contains(out.String(), absent) {
			t.Errorf("targets mention %q, whose benchmarks did not run:\n%s", absent, out.String())
		}
	}
}

// A history row gives what the machine-bound targets hang on (a GET,
// puddle, the bare map against puddle) and their verdicts with the runs
// that met them, marks a missed median, and names any other target missed.
func TestHistoryRowReadsTheTargets(t *testing.T) {
	rs := parse(strings.NewReader(threeHotRuns + `
BenchmarkRedisPaths/baseline-GET-2                   1000  20000 ns/op
BenchmarkRedisPaths/ref-GET-then-e2b-Connect-2       1000  60000 ns/op
BenchmarkRedisPaths/warm-redis-hit-e2b-fake-2        1000  63000 ns/op  55 io-µs/op  8 own-µs/op
BenchmarkReaperTickIdle-2                        1000  30 ns/op
`))
	// Pool over puddle run by run 1.07, 1.79, 0.93: a missed median, one
	// run faster. The warm path 63 µs against 0.5 × 20 + 60 = 70: 0.90.
	// Its own time, 8 µs, is 0.40 of the GET. One allocation in a run
	// breaks "allocates nothing".
	want := "| r1 | 20 µs | 140 ns | 0.71× | **1.07×** (1 of 3) | — | — | 0.90 | 0.40 | hot path allocates nothing: 1 allocs/op at most |"
	if got := historyRow("r1", rs); got != want {
		t.Errorf("history row:\n got %s\nwant %s", got, want)
	}
	header, _, _ := strings.Cut(historyHeader, "\n")
	if got, want := strings.Count(header, "|"), strings.Count(want, "|"); got != want {
		t.Errorf("history header has %d bars, a row %d: one column per cell", got, want)
	}
}

// Runs are listed in the order of their numbers, not of their names'
// characters: run 9 before run 10.
func TestHistoryOrdersRunsByNumber(t *testing.T) {
	files := []string{"bench-2026-11-27-10.txt", "bench-contended.txt", "bench-2026-11-27-9.txt", "bench-2026-11-26-14.txt"}
	slices.SortFunc(files, naturalCompare)
	want := []string{"bench-2026-11-26-14.txt", "bench-2026-11-27-9.txt", "bench-2026-11-27-10.txt", "bench-contended.txt"}
	if !slices.Equal(files, want) {
		t.Errorf("sorted %q, want %q", files, want)
	}
}

// testdata/README.md's table of the recorded runs is what the history
// prints from the files beside it: adding a run without regenerating the
// table (make bench-history) fails here.
func TestRecordedRunsTableMatchesTheFiles(t *testing.T) {
	files, err := filepath.Glob("../../testdata/bench-*.txt")
	if err != nil || len(files) == 0 {
		t.Fatalf("no recorded runs in ../../testdata (%v)", err)
	}
	var out strings.Builder
	if err := history(&out, files); err != nil {
		t.Fatal(err)
	}
	doc, err := os.ReadFile("../../testdata/README.md")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(doc), out.String()) {
		t.Errorf("testdata/README.md lacks the history of its runs; run make bench-history and paste:\n%s", out.String())
	}
}
