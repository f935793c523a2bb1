// Command benchtable reads `go test -bench` output on stdin and prints the
// figures of sandboxpool's benchmarks as ratios to the baselines measured in
// the same run. A benchmark run several times (with -count, or in several
// processes one after another, as make bench does) is reported by the median
// of each of its metrics, and a ratio by the median of the ratios of the runs
// made side by side (run i of one against run i of its baseline), which a
// noisy shared machine needs: its speed drifts between runs. A second table
// reads the figures against the library's performance targets (see
// targets). With -history, it reads the files it is given instead, the
// recorded runs, and prints one row per run (see history).
package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// result is one benchmark line: name, GOMAXPROCS and its metrics.
type result struct {
	name    string
	procs   int
	metrics map[string]float64
}

var line = regexp.MustCompile(`^Benchmark(\S+?)(?:-(\d+))?\s+\d+\s+(.*)$`)

// runValues holds every run's value of each metric, in order, by name and
// GOMAXPROCS: ratios pair runs made side by side, and a target such as "0
// allocations" is read against every run, not the median.
var runValues = map[string]map[string][]float64{}

// runsOf is r's runs of metric, in order.
func runsOf(r result, metric string) []float64 { return runValues[runKey(r.name, r.procs)][metric] }

func runKey(name string, procs int) string { return name + "/" + strconv.Itoa(procs) }

// ratio is the median over side-by-side runs of r's ns/op over base's.
func ratio(r, base result) float64 {
	med, _, _, _ := ratioRuns(r, base)
	return med
}

// ratioRuns is ratio with the lowest and highest run ratio and the number of
// pairs of runs compared.
func ratioRuns(r, base result) (med, lo, hi float64, n int) {
	rs := runRatios(r, base)
	if len(rs) == 0 {
		x := r.metrics["ns/op"] / base.metrics["ns/op"]
		return x, x, x, 1
	}
	med, lo, hi = medianRange(rs)
	return med, lo, hi, len(rs)
}

// medianRange sorts the run ratios rs and returns their median, lowest and
// highest.
func medianRange(rs []float64) (med, lo, hi float64) {
	sort.Float64s(rs)
	return rs[len(rs)/2], rs[0], rs[len(rs)-1]
}

// spread formats r's ratio to base, with its range over the runs when there
// were several: on a drifting machine, a median alone hides how far a
// verdict ("faster than") can be trusted.
func spread(r, base result, unit string) string {
	med, lo, hi, n := ratioRuns(r, base)
	if n < 2 {
		return fmt.Sprintf("%.2f×%s", med, unit)
	}
	return fmt.Sprintf("%.2f×%s (%.2f–%.2f)", med, unit, lo, hi)
}

// budget is the issue's warm-path target, "1.5 × GET plus the provider
// call", as a fraction: warm ÷ (k × GET + call) run by run, the median with
// the lowest and highest; at most 1 meets it. call is either the provider
// call alone (k = 1.5) or a GET followed by the call (k = 0.5).
func budget(warm, get, call result, k float64) (med, lo, hi float64, ok bool) {
	rs := budgetRuns(warm, get, call, k)
	if len(rs) == 0 {
		return 0, 0, 0, false
	}
	med, lo, hi = medianRange(rs)
	return med, lo, hi, true
}

// ownTime describes how a warm Acquire's time splits (benchWarm's io-µs/op
// and own-µs/op): its I/O, and the pool's own time with its fraction of a
// GET, run by run (the median with the range). It is empty for a result
// without the split.
func ownTime(warm, get result) string {
	med, lo, hi, ok := ownShare(warm, get)
	if !ok {
		return ""
	}
	return fmt.Sprintf("; I/O %.1f µs/op, the pool's own time %.1f µs/op: %.2f of a GET (%.2f–%.2f)",
		warm.metrics["io-µs/op"], warm.metrics["own-µs/op"], med, lo, hi)
}

// ownShare is the pool's own time in a warm Acquire (benchWarm's
// own-µs/op) as a fraction of the GET of the same run, the median with the
// lowest and highest; ok is false for a result without the split.
func ownShare(warm, get result) (med, lo, hi float64, ok bool) {
	rs := divideRuns(runsOf(warm, "own-µs/op"), runsOf(get, "ns/op"))
	if len(rs) == 0 {
		return 0, 0, 0, false
	}
	const nsPerµs = 1e3
	for i := range rs {
		rs[i] *= nsPerµs
	}
	med, lo, hi = medianRange(rs)
	return med, lo, hi, true
}

// budgetRuns is budget's fraction run by run.
func budgetRuns(warm, get, call result, k float64) []float64 {
	w, g, c := runsOf(warm, "ns/op"), runsOf(get, "ns/op"), runsOf(call, "ns/op")
	rs := make([]float64, min(len(w), len(g), len(c)))
	for i := range rs {
		rs[i] = w[i] / (k*g[i] + c[i])
	}
	return rs
}

// parse reads benchmark lines, recording each run's values (see runValues),
// and returns one result per benchmark holding its medians.
func parse(in io.Reader) []result {
	runValues = map[string]map[string][]float64{}
	var runs []result
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		m := line.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		procs := 1
		if m[2] != "" {
			procs, _ = strconv.Atoi(m[2])
		}
		r := result{name: m[1], procs: procs, metrics: map[string]float64{}}
		f := strings.Fields(m[3])
		for i := 0; i+1 < len(f); i += 2 {
			if v, err := strconv.ParseFloat(f[i], 64); err == nil {
				r.metrics[f[i+1]] = v
			}
		}
		runs = append(runs, r)
		k := runKey(r.name, r.procs)
		if runValues[k] == nil {
			runValues[k] = map[string][]float64{}
		}
		for m, v := range r.metrics {
			runValues[k][m] = append(runValues[k][m], v)
		}
	}
	return medians(runs)
}

// medians folds repeated runs of a benchmark into one result holding the
// median of each metric (over its runs in runValues), keeping the order of
// first appearance.
func medians(runs []result) []result {
	seen := map[string]bool{}
	var out []result
	for _, r := range runs {
		k := runKey(r.name, r.procs)
		if seen[k] {
			continue
		}
		seen[k] = true
		med := result{name: r.name, procs: r.procs, metrics: map[string]float64{}}
		for m, vs := range runValues[k] {
			sorted := slices.Sorted(slices.Values(vs)) // a copy: runValues keeps run order for pairing
			med.metrics[m] = sorted[len(sorted)/2]
		}
		out = append(out, med)
	}
	return out
}

// find returns the result of benchmark name at GOMAXPROCS procs.
func find(rs []result, name string, procs int) (result, bool) {
	for _, r := range rs {
		if r.name == name && r.procs == procs {
			return r, true
		}
	}
	return result{}, false
}

func main() {
	hist := flag.Bool("history", false, "print one row per file of make bench output named as an argument (the runs kept in testdata/) instead of reading stdin")
	flag.Parse()
	if *hist {
		if err := history(os.Stdout, flag.Args()); err != nil {
			fmt.Fprintln(os.Stderr, "benchtable:", err)
			os.Exit(1)
		}
		return
	}
	rs := parse(os.Stdin)
	table(os.Stdout, rs)
	fmt.Println()
	targets(os.Stdout, rs)
}

// table prints rs as one markdown table: each hot-path group against its
// baseline (and puddle and the map of records, where they ran), the Redis
// paths against a GET, then the contention, memory and reaper figures.
func table(w io.Writer, rs []result) {
	get := func(name string, procs int) (result, bool) { return find(rs, name, procs) }
	procsSeen := map[int]bool{}
	for _, r := range rs {
		procsSeen[r.procs] = true
	}
	var procs []int
	for p := range procsSeen {
		procs = append(procs, p)
	}
	sort.Ints(procs)

	fmt.Fprintln(w, "| benchmark | GOMAXPROCS | ns/op | allocs/op | B/op | ratio (range over runs) | note |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|")
	row := func(r result, ratio, note string) {
		fmt.Fprintf(w, "| %s | %d | %.1f | %.0f | %.0f | %s | %s |\n", r.name, r.procs, r.metrics["ns/op"], r.metrics["allocs/op"], r.metrics["B/op"], ratio, note)
	}
	for _, p := range procs {
		for _, g := range hotGroups {
			group := g.name
			base, ok := get(group+"/baseline-maphash64", p)
			if !ok {
				continue
			}
			row(base, "1.00×", "baseline: 64-shard maphash map + atomic store")
			naive, hasNaive := get(group+"/naive-global-mutex+redis-GET", p)
			pud, hasPud := get(group+"/puddle-Acquire+Release", p)
			rec, hasRec := get(group+"/ref-maphash64-128B-records", p)
			for _, name := range []string{"sandboxpool-Acquire+Release", "sandboxpool-Use", "sandboxpool-with-redis-Acquire+Release"} {
				r, found := get(group+"/"+name, p)
				if !found {
					continue
				}
				var notes []string
				if hasNaive {
					notes = append(notes, fmt.Sprintf("%.0f× faster than the old single-mutex design", 1/ratio(r, naive)))
				}
				if hasPud {
					notes = append(notes, spread(r, pud, " puddle/v2"))
				}
				if hasRec {
					notes = append(notes, spread(r, rec, " the map of 128-byte records"))
				}
				if rt, has := r.metrics["redis-rt/op"]; has {
					notes = append(notes, fmt.Sprintf("%.3f Redis round trips/op", rt))
				}
				row(r, spread(r, base, ""), strings.Join(notes, "; "))
			}
			if hasRec {
				note := "reference: the baseline's map with a 128-byte record per pair, a slot's size"
				if hasPud {
					note += "; " + spread(rec, pud, " puddle/v2")
				}
				row(rec, spread(rec, base, ""), note)
			}
			if hasPud {
				row(pud, spread(pud, base, ""), "jackc/puddle/v2")
			}
			if hasNaive {
				row(naive, fmt.Sprintf("%.2f×", ratio(naive, base)), "old design: one global mutex, Redis GET per request")
			}
		}
		get1, hasGet := get("RedisPaths/baseline-GET", p)
		if hasGet {
			row(get1, "1.00×", "baseline: one plain go-redis GET")
			// refRows prints references (name, what it measures) against the GET.
			refRows := func(refs ...[2]string) {
				for _, ref := range refs {
					if r, found := get(ref[0], p); found {
						row(r, spread(r, get1, " GET"), ref[1])
					}
				}
			}
			refRows([2]string{"RedisPaths/ref-HGETALL", "reference: one read of a record"},
				[2]string{"RedisPaths/ref-GET-on-new-goroutine", "reference: a GET handed to a new goroutine, as fills were before they ran on workers"},
				[2]string{"RedisPaths/ref-GET-on-worker-with-deadlines", "reference: a GET handed to a waiting worker under a fill's two deadlines, as a fill is"})
			for _, name := range []string{"RedisPaths/warm-redis-hit", "RedisPaths/cold-create"} {
				if r, found := get(name, p); found {
					row(r, spread(r, get1, " GET"), fmt.Sprintf("%.2f Redis round trips/op", r.metrics["redis-rt/op"])+ownTime(r, get1))
				}
			}
			refRows([2]string{"RedisPaths/ref-e2b-Connect", "reference: one Connect to the fake E2B over HTTP, in a tight loop of Connects"},
				[2]string{"RedisPaths/ref-GET-then-e2b-Connect", "reference: a GET, then one Connect to the fake E2B: the warm path's own I/O in its order, with no pool"})
			// budget reports no figure for a reference that did not run.
			conn, _ := get("RedisPaths/ref-e2b-Connect", p)
			seq, _ := get("RedisPaths/ref-GET-then-e2b-Connect", p)
			if r, found := get("RedisPaths/warm-redis-hit-e2b-fake", p); found {
				note := fmt.Sprintf("%.2f Redis round trips/op", r.metrics["redis-rt/op"])
				if med, lo, hi, ok := budget(r, get1, seq, 0.5); ok {
					note += fmt.Sprintf("; %.2f of the budget 1.5×GET + Connect, the Connect made after a GET (%.2f–%.2f)", med, lo, hi)
				}
				if med, lo, hi, ok := budget(r, get1, conn, 1.5); ok {
					note += fmt.Sprintf("; %.2f with the Connect timed in a tight loop (%.2f–%.2f)", med, lo, hi)
				}
				note += ownTime(r, get1)
				row(r, spread(r, get1, " GET"), note)
			}
		}
		for _, r := range rs {
			if r.procs != p || !strings.HasPrefix(r.name, "Contention") && !strings.HasPrefix(r.name, "Memory") && !strings.HasPrefix(r.name, "Reaper") {
				continue
			}
			var notes []string
			keys := make([]string, 0, len(r.metrics))
			for k := range r.metrics {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, k := range keys {
				if k != "ns/op" && k != "allocs/op" && k != "B/op" {
					notes = append(notes, fmt.Sprintf("%s=%.4g", k, r.metrics[k]))
				}
			}
			row(r, "", strings.Join(notes, ", "))
		}
	}
}
