// Command benchtable reads `go test -bench` output on stdin and prints the
// figures of sandboxpool's benchmarks as ratios to the baselines measured in
// the same run. A benchmark run several times (-count) is reported by the
// median of each of its metrics, which a noisy shared machine needs.
package main

import (
	"bufio"
	"fmt"
	"os"
	"regexp"
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

func parse() []result {
	var runs []result
	sc := bufio.NewScanner(os.Stdin)
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
	}
	return medians(runs)
}

// medians folds repeated runs of a benchmark into one result holding the
// median of each metric, keeping the order of first appearance.
func medians(runs []result) []result {
	type id struct {
		name  string
		procs int
	}
	var order []id
	values := map[id]map[string][]float64{}
	for _, r := range runs {
		k := id{r.name, r.procs}
		if values[k] == nil {
			values[k] = map[string][]float64{}
			order = append(order, k)
		}
		for m, v := range r.metrics {
			values[k][m] = append(values[k][m], v)
		}
	}
	out := make([]result, 0, len(order))
	for _, k := range order {
		r := result{name: k.name, procs: k.procs, metrics: map[string]float64{}}
		for m, vs := range values[k] {
			sort.Float64s(vs)
			r.metrics[m] = vs[len(vs)/2]
		}
		out = append(out, r)
	}
	return out
}

func main() {
	rs := parse()
	get := func(name string, procs int) (result, bool) {
		for _, r := range rs {
			if r.name == name && r.procs == procs {
				return r, true
			}
		}
		return result{}, false
	}
	procsSeen := map[int]bool{}
	for _, r := range rs {
		procsSeen[r.procs] = true
	}
	var procs []int
	for p := range procsSeen {
		procs = append(procs, p)
	}
	sort.Ints(procs)

	fmt.Println("| benchmark | GOMAXPROCS | ns/op | allocs/op | ratio | note |")
	fmt.Println("|---|---|---|---|---|---|")
	row := func(r result, ratio, note string) {
		fmt.Printf("| %s | %d | %.1f | %.0f | %s | %s |\n", r.name, r.procs, r.metrics["ns/op"], r.metrics["allocs/op"], ratio, note)
	}
	for _, p := range procs {
		base, ok := get("HotPath/baseline-maphash64", p)
		if ok {
			row(base, "1.00×", "baseline: 64-shard maphash map + atomic store")
		}
		naive, hasNaive := get("HotPath/naive-global-mutex+redis-GET", p)
		pud, hasPud := get("HotPath/puddle-Acquire+Release", p)
		for _, name := range []string{"HotPath/sandboxpool-Acquire+Release", "HotPath/sandboxpool-Use", "HotPath/sandboxpool-with-redis-Acquire+Release"} {
			r, found := get(name, p)
			if !found || !ok {
				continue
			}
			note := ""
			if hasNaive {
				note += fmt.Sprintf("%.0f× faster than the old single-mutex design; ", naive.metrics["ns/op"]/r.metrics["ns/op"])
			}
			if hasPud {
				note += fmt.Sprintf("%.2f× puddle/v2", r.metrics["ns/op"]/pud.metrics["ns/op"])
			}
			if rt, has := r.metrics["redis-rt/op"]; has {
				note += fmt.Sprintf("; %.3f Redis round trips/op", rt)
			}
			row(r, fmt.Sprintf("%.2f×", r.metrics["ns/op"]/base.metrics["ns/op"]), note)
		}
		if hasPud && ok {
			row(pud, fmt.Sprintf("%.2f×", pud.metrics["ns/op"]/base.metrics["ns/op"]), "jackc/puddle/v2")
		}
		if hasNaive && ok {
			row(naive, fmt.Sprintf("%.2f×", naive.metrics["ns/op"]/base.metrics["ns/op"]), "old design: one global mutex, Redis GET per request")
		}
		get1, hasGet := get("RedisPaths/baseline-GET", p)
		if hasGet {
			row(get1, "1.00×", "baseline: one plain go-redis GET")
			for _, name := range []string{"RedisPaths/warm-redis-hit", "RedisPaths/cold-create"} {
				if r, found := get(name, p); found {
					row(r, fmt.Sprintf("%.2f× GET", r.metrics["ns/op"]/get1.metrics["ns/op"]), fmt.Sprintf("%.2f Redis round trips/op", r.metrics["redis-rt/op"]))
				}
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
