package main

import (
	"cmp"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// The history: one row per recorded run of make bench (the files kept in
// testdata/), so that the targets a machine can move are read across
// machines and days, not from one run. Each row gives what such a target
// hangs on (a GET's time, puddle's, the bare map's against puddle's) and the
// targets' verdicts, a ratio with how many of the run's side-by-side runs
// met it.

// puddleKey and budgetKey name the verdicts the history has columns for.
func puddleKey(group string) string { return "puddle:" + group }
func budgetKey(procs int) string    { return "budget:" + strconv.Itoa(procs) }

// historyKeys are the verdicts given columns, in column order.
var historyKeys = []string{puddleKey("HotPath"), puddleKey("HotPathArrivalIDs"), budgetKey(1), budgetKey(2)}

// historyHeader is the history table's header row and rule.
const historyHeader = "| run | GET (GOMAXPROCS=2) | puddle | bare map ÷ puddle, ids by pair | pool ÷ puddle, ids by pair | pool ÷ puddle, ids in arrival order | warm path ÷ budget, GOMAXPROCS=1 | warm path ÷ budget, GOMAXPROCS=2 | the pool's own time in a warm call ÷ GET, GOMAXPROCS=2 | other targets missed |\n" +
	"|---|---|---|---|---|---|---|---|---|---|\n"

// history prints one row for each file of make bench output, in the order
// of their names read as numbers where they hold digits (bench-…-9 before
// bench-…-10).
func history(w io.Writer, files []string) error {
	files = slices.Clone(files)
	slices.SortFunc(files, naturalCompare)
	fmt.Fprint(w, historyHeader)
	for _, f := range files {
		fh, err := os.Open(f)
		if err != nil {
			return err
		}
		rs := parse(fh)
		fh.Close()
		fmt.Fprintln(w, historyRow(runName(f), rs))
	}
	return nil
}

// runName is a file's name without "bench-" and ".txt".
func runName(file string) string {
	return strings.TrimSuffix(strings.TrimPrefix(filepath.Base(file), "bench-"), ".txt")
}

// historyRow is one run's row. What a run did not measure is "—".
func historyRow(name string, rs []result) string {
	cells := []string{name, "—", "—", "—"}
	get, okGet := find(rs, "RedisPaths/baseline-GET", hotProcs)
	if okGet {
		cells[1] = fmt.Sprintf("%.0f µs", get.metrics["ns/op"]/1e3)
	}
	pud, okPud := find(rs, "HotPath/puddle-Acquire+Release", hotProcs)
	if okPud {
		cells[2] = fmt.Sprintf("%.0f ns", pud.metrics["ns/op"])
	}
	if base, ok := find(rs, "HotPath/baseline-maphash64", hotProcs); ok && okPud {
		cells[3] = fmt.Sprintf("%.2f×", ratio(base, pud))
	}
	vs := readTargets(rs)
	for _, key := range historyKeys {
		cell := "—"
		if i := slices.IndexFunc(vs, func(v verdict) bool { return v.key == key }); i >= 0 {
			cell = verdictCell(vs[i])
		}
		cells = append(cells, cell)
	}
	own := "—"
	if warm, ok := find(rs, "RedisPaths/warm-redis-hit-e2b-fake", hotProcs); ok && okGet {
		if med, _, _, ok := ownShare(warm, get); ok {
			own = fmt.Sprintf("%.2f", med)
		}
	}
	cells = append(cells, own)
	var missed []string
	for _, v := range vs {
		if !v.met && !slices.Contains(historyKeys, v.key) {
			missed = append(missed, v.target+": "+v.figure)
		}
	}
	if len(missed) == 0 {
		missed = append(missed, "none")
	}
	cells = append(cells, strings.Join(missed, "; "))
	return "| " + strings.Join(cells, " | ") + " |"
}

// verdictCell is a ratio's median, marked when it misses its target, with
// how many runs met the target.
func verdictCell(v verdict) string {
	unit := "×"
	if strings.HasPrefix(v.key, "budget:") {
		unit = ""
	}
	cell := fmt.Sprintf("%.2f%s", v.med, unit)
	if !v.met {
		cell = "**" + cell + "**"
	}
	if v.runs > 1 {
		cell += fmt.Sprintf(" (%d of %d)", v.runsMet, v.runs)
	}
	return cell
}

// naturalCompare orders strings with their runs of digits compared as
// numbers.
func naturalCompare(a, b string) int {
	for a != "" && b != "" {
		da, db := digitRun(a), digitRun(b)
		if da > 0 && db > 0 {
			na, _ := strconv.Atoi(a[:da])
			nb, _ := strconv.Atoi(b[:db])
			if c := cmp.Compare(na, nb); c != 0 {
				return c
			}
			a, b = a[da:], b[db:]
			continue
		}
		if c := cmp.Compare(a[0], b[0]); c != 0 {
			return c
		}
		a, b = a[1:], b[1:]
	}
	return cmp.Compare(len(a), len(b))
}

// digitRun is the length of s's leading run of digits.
func digitRun(s string) int {
	return len(s) - len(strings.TrimLeft(s, "0123456789"))
}
