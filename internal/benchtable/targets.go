package main

import (
	"fmt"
	"io"
	"strings"
)

// hotGroups are the hot path's four measurements, in the order they are
// printed, with what each one visits.
var hotGroups = []struct{ name, what string }{
	{"HotPath", "100k pairs, random order, ids read by pair"},
	{"HotPathArrivalIDs", "100k pairs, random order, ids in arrival order"},
	{"HotPathIndexOrder", "100k pairs, creation order"},
	{"HotPathCacheResident", "4,096 pairs in cache, random order"},
}

// hotProcs is the GOMAXPROCS the hot path's targets are set at.
const hotProcs = 2

// Targets of the proof-under-load issue, each a bound a figure must stay
// within.
const (
	maxHotVsBaseline = 2.0     // hot path at most this many times the bare map
	maxWarmRoundTrip = 2       // Redis round trips of a warm Acquire
	maxColdRoundTrip = 5       // Redis round trips of a cold Acquire
	maxBytesPerPair  = 256     // bytes per pooled pair at 1,000,000 pairs
	maxHeapAfterPct  = 10      // heap after churn, percent above its start
	maxReaperTickNs  = 1000000 // one reaper tick with nothing due: 1 ms
)

// verdict is one target read against the figures of a run of make bench.
type verdict struct {
	key            string // set on the targets the history reads (see historyKeys)
	target, figure string
	met            bool
	// A ratio target also keeps its median, and how many of the
	// side-by-side runs met it out of how many (runs is 0 for a count).
	med           float64
	runsMet, runs int
}

// targets prints the targets against the figures in rs (see
// readTargets), one row each: the target, the figure it is read on and the
// verdict.
func targets(w io.Writer, rs []result) {
	fmt.Fprintln(w, "| target | figure | met |")
	fmt.Fprintln(w, "|---|---|---|")
	for _, v := range readTargets(rs) {
		met := "yes"
		if !v.met {
			met = "no"
		}
		fmt.Fprintf(w, "| %s | %s | %s |\n", v.target, v.figure, met)
	}
}

// readTargets reads the targets against the figures in rs: each
// target, the figure it is read on (a ratio with its range and how many of
// the side-by-side runs met it; a count at its highest in any run, or its
// range where too few is as wrong as too many) and the verdict. A ratio's
// verdict is its median's; "not in every run" says that some runs did not
// meet it. A target whose benchmark did not run is left out.
func readTargets(rs []result) []verdict {
	get := func(name string, procs int) (result, bool) { return find(rs, name, procs) }
	var out []verdict
	row := func(target, figure string, met bool) {
		out = append(out, verdict{target: target, figure: figure, met: met})
	}
	// ratioRow reads a ratio, given by its median and range and its value
	// run by run: the verdict is the median's, with how many runs met the
	// bound too.
	ratioRow := func(key, target string, med, lo, hi float64, runs []float64, b bound, unit, note string) {
		fig := fmt.Sprintf("%.2f%s (%.2f–%.2f)", med, unit, lo, hi)
		k := 0
		for _, x := range runs {
			if b.holds(x) {
				k++
			}
		}
		if len(runs) > 1 {
			fig += fmt.Sprintf(", met in %d of %d runs", k, len(runs))
			if b.holds(med) && k < len(runs) {
				fig += ": not in every run"
			}
		}
		out = append(out, verdict{key: key, target: target, figure: fig + note, met: b.holds(med), med: med, runsMet: k, runs: len(runs)})
	}
	versus := func(key, target string, r, base result, b bound, note string) {
		med, lo, hi, _ := ratioRuns(r, base)
		ratioRow(key, target, med, lo, hi, runRatios(r, base), b, "×", note)
	}
	for _, g := range hotGroups {
		pool, ok := get(g.name+"/sandboxpool-Acquire+Release", hotProcs)
		if !ok {
			continue
		}
		base, okBase := get(g.name+"/baseline-maphash64", hotProcs)
		if okBase {
			versus("", fmt.Sprintf("hot path ≤ %g× the bare map (%s; GOMAXPROCS=%d)", maxHotVsBaseline, g.what, hotProcs), pool, base, bound{maxHotVsBaseline, false}, "")
		}
		if pud, ok := get(g.name+"/puddle-Acquire+Release", hotProcs); ok {
			// The two targets together assume the bare map faster than
			// puddle (about 30 ns against 150): where the machine makes it
			// slower, no pool within 2× of it can beat puddle, and the row
			// says so.
			note := ""
			if okBase {
				med, _, _, _ := ratioRuns(base, pud)
				note = fmt.Sprintf("; the bare map itself %.2f× puddle", med)
			}
			versus(puddleKey(g.name), fmt.Sprintf("hot path faster than puddle (%s; GOMAXPROCS=%d)", g.what, hotProcs), pool, pud, bound{1, true}, note)
		}
	}
	// Counts are read at their highest in any run, at every GOMAXPROCS.
	highest := func(prefix, metric string) (float64, bool) {
		_, hi, ok := extremes(rs, func(name string) bool { return strings.HasPrefix(name, prefix) }, metric)
		return hi, ok
	}
	pooled := func(name string) bool {
		return strings.HasPrefix(name, "HotPath") && strings.Contains(name, "/sandboxpool-")
	}
	if _, v, ok := extremes(rs, pooled, "allocs/op"); ok {
		row("hot path allocates nothing", fmt.Sprintf("%.0f allocs/op at most", v), v == 0)
	}
	if v, ok := highest("HotPath/sandboxpool-with-redis-", "redis-rt/op"); ok {
		row("hot path makes no Redis call", fmt.Sprintf("%.3f round trips/op at most", v), v == 0)
	}
	if v, ok := highest("RedisPaths/warm-", "redis-rt/op"); ok {
		row(fmt.Sprintf("warm path ≤ %d Redis round trips", maxWarmRoundTrip), fmt.Sprintf("%.2f at most", v), v <= maxWarmRoundTrip)
	}
	if v, ok := highest("RedisPaths/cold-", "redis-rt/op"); ok {
		row(fmt.Sprintf("cold path ≤ %d Redis round trips", maxColdRoundTrip), fmt.Sprintf("%.2f at most", v), v <= maxColdRoundTrip)
	}
	for _, p := range []int{1, 2} {
		warm, okW := get("RedisPaths/warm-redis-hit-e2b-fake", p)
		get1, okG := get("RedisPaths/baseline-GET", p)
		seq, okS := get("RedisPaths/ref-GET-then-e2b-Connect", p)
		if !okW || !okG || !okS {
			continue
		}
		if med, lo, hi, ok := budget(warm, get1, seq, 0.5); ok {
			ratioRow(budgetKey(p), fmt.Sprintf("warm path ≤ 1.5× GET + the provider call, the call made after a GET (GOMAXPROCS=%d)", p),
				med, lo, hi, budgetRuns(warm, get1, seq, 0.5), bound{1, false}, " of the budget", "")
		}
	}
	contention := func(name string) bool { return strings.HasPrefix(name, "Contention/") }
	if lo, hi, ok := extremes(rs, contention, "creates/pair"); ok {
		row("contention: creates equal pairs", fmt.Sprintf("%.2f–%.2f creates per pair", lo, hi), lo == 1 && hi == 1)
	}
	if v, ok := highest("MemoryPerPair", "B/pair"); ok {
		row(fmt.Sprintf("≤ %d bytes per pooled pair at 1,000,000 pairs", maxBytesPerPair), fmt.Sprintf("%.1f B at most", v), v <= maxBytesPerPair)
	}
	if v, ok := highest("MemoryPerPair", "heap-after-churn-%"); ok {
		row(fmt.Sprintf("heap within %d%% of its start after churn", maxHeapAfterPct), fmt.Sprintf("%+.2f%% at most", v), v <= maxHeapAfterPct)
	}
	if v, ok := highest("ReaperTickIdle", "ns/op"); ok {
		row("reaper tick < 1 ms with nothing due", fmt.Sprintf("%.0f ns at most", v), v < maxReaperTickNs)
	}
	return out
}

// extremes are the lowest and highest values metric took in any run of the
// benchmarks whose names match, at any GOMAXPROCS; ok is false when none
// reported it.
func extremes(rs []result, match func(name string) bool, metric string) (lo, hi float64, ok bool) {
	for _, r := range rs {
		if !match(r.name) {
			continue
		}
		for _, x := range runsOf(r, metric) {
			if !ok {
				lo, hi, ok = x, x, true
			}
			lo, hi = min(lo, x), max(hi, x)
		}
	}
	return lo, hi, ok
}

// bound is a target on a ratio: below limit, or at most limit when not
// strict.
type bound struct {
	limit  float64
	strict bool
}

func (b bound) holds(x float64) bool { return x < b.limit || !b.strict && x == b.limit }

// runRatios is r's ns/op over base's, run by run.
func runRatios(r, base result) []float64 {
	return divideRuns(runsOf(r, "ns/op"), runsOf(base, "ns/op"))
}

// divideRuns divides the values of side-by-side runs, a[i] / b[i], over the
// runs both have.
func divideRuns(a, b []float64) []float64 {
	out := make([]float64, min(len(a), len(b)))
	for i := range out {
		out[i] = a[i] / b[i]
	}
	return out
}
