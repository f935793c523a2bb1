package sandboxpool

import (
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"
)

// The reaper's heap, against a plain map of due times, under random
// schedules (new slots and rescheduled ones, earlier and later), removals
// and pops: after every step it is a heap, every slot knows its place in
// it, and a pop returns exactly the slots due, each once. A tick's cost
// rests on it (TestReaperCostProportionalToExpiries), and so does every
// deadline the reaper enforces.
func TestReaperHeapAgreesWithAMapOfDueTimes(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	r := newReaper()
	slots := make([]*slot, 200)
	for i := range slots {
		slots[i] = &slot{heapIdx: -1}
	}
	want := map[*slot]int64{}
	check := func(step int) { // plain ifs: it runs 200 entries a step
		t.Helper()
		if len(r.h) != len(want) {
			t.Fatalf("step %d: %d entries, want %d", step, len(r.h), len(want))
		}
		for i, e := range r.h {
			switch {
			case e.s.heapIdx != int32(i):
				t.Fatalf("step %d: the slot at %d thinks it is at %d", step, i, e.s.heapIdx)
			case e.due != want[e.s]:
				t.Fatalf("step %d: due %d, want %d", step, e.due, want[e.s])
			case i > 0 && r.h[(i-1)/2].due > e.due:
				t.Fatalf("step %d: not a heap at %d", step, i)
			}
		}
	}
	now := int64(0)
	for step := range 20_000 {
		s := slots[rng.IntN(len(slots))]
		switch op := rng.IntN(10); {
		case op < 6: // schedule: a new slot, or one already there (fix)
			due := now + rng.Int64N(1000)
			r.schedule(s, due)
			want[s] = due
		case op < 8:
			r.unschedule(s)
			delete(want, s)
			require.EqualValues(t, -1, s.heapIdx)
		default:
			now += rng.Int64N(50)
			var due []*slot
			for s, d := range want {
				if d <= now {
					due = append(due, s)
					delete(want, s)
				}
			}
			got := r.popDue(now)
			require.ElementsMatch(t, due, got, "step %d", step)
			for _, s := range got {
				require.EqualValues(t, -1, s.heapIdx)
			}
		}
		check(step)
	}
	require.True(t, slices.ContainsFunc(slots, func(s *slot) bool { return s.heapIdx >= 0 }), "the walk ended with an empty heap: it tested little")
}
