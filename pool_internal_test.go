package sandboxpool

import (
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func testSlot(sh *shard, user string) (*slot, uint64) {
	k := pairKey{user, "p"}
	h := hashPair(sh.seed, k)
	return &slot{key: k, heapIdx: -1}, h
}

// Pairs whose 64-bit hashes collide share a chain: each is still found by
// its own key, and unlinking any position leaves the others reachable.
func TestIndexChains(t *testing.T) {
	sh := newPool(1).shards[0]
	const h = 42 // every slot below in one chain, as colliding hashes would be
	var slots []*slot
	sh.mu.Lock()
	defer sh.mu.Unlock()
	for i := range 4 {
		s := &slot{key: pairKey{fmt.Sprint("u", i), "p"}, heapIdx: -1}
		sh.insertLocked(h, s)
		slots = append(slots, s)
	}
	for _, s := range slots {
		assert.Same(t, s, sh.lookup(h, s.key))
	}
	assert.Nil(t, sh.lookup(h, pairKey{"missing", "p"}))
	for _, i := range []int{1, 3, 0, 2} { // middle, head (last inserted), tail, the only one left
		require.True(t, sh.unlinkLocked(h, slots[i]))
		assert.Nil(t, sh.lookup(h, slots[i].key))
		assert.Nil(t, slots[i].next.Load())
		assert.False(t, sh.unlinkLocked(h, slots[i]), "unlinking twice is refused")
		for _, j := range []int{0, 1, 2, 3} {
			if sh.lookup(h, slots[j].key) == nil {
				continue
			}
			assert.Same(t, slots[j], sh.lookup(h, slots[j].key))
		}
	}
	assert.Zero(t, sh.n)
}

// The index grows to one slot per bucket and shrinks back as slots leave,
// so a churned shard keeps only what its live pairs need.
func TestIndexResizes(t *testing.T) {
	sh := newPool(1).shards[0]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	var slots []*slot
	for i := range 10_000 {
		s, h := testSlot(sh, fmt.Sprint("u", i))
		sh.insertLocked(h, s)
		slots = append(slots, s)
	}
	assert.Equal(t, 16384, len(sh.idx.Load().buckets))
	for _, s := range slots {
		require.Same(t, s, sh.lookup(hashPair(sh.seed, s.key), s.key))
	}
	for _, s := range slots[10:] {
		require.True(t, sh.unlinkLocked(hashPair(sh.seed, s.key), s))
	}
	assert.LessOrEqual(t, len(sh.idx.Load().buckets), 64, "buckets follow the live slots down")
	for _, s := range slots[:10] {
		require.Same(t, s, sh.lookup(hashPair(sh.seed, s.key), s.key))
	}
	var n int
	sh.eachLocked(func(*slot) { n++ })
	assert.Equal(t, 10, n)
}

// Lock-free readers racing a writer that inserts, unlinks and resizes never
// see another pair's slot and never hang; once the writer stops, every slot
// that stayed is found again.
func TestIndexConcurrentReaders(t *testing.T) {
	sh := newPool(1).shards[0]
	var stay, churn []*slot
	for i := range 2000 {
		s, _ := testSlot(sh, fmt.Sprint("stay", i))
		stay = append(stay, s)
		c, _ := testSlot(sh, fmt.Sprint("churn", i))
		churn = append(churn, c)
	}
	sh.mu.Lock()
	for _, s := range stay {
		sh.insertLocked(hashPair(sh.seed, s.key), s)
	}
	sh.mu.Unlock()

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var found, missed atomic.Int64
	for range 4 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				for j, want := range []*slot{stay[i%len(stay)], churn[i%len(churn)]} {
					got := sh.lookup(hashPair(sh.seed, want.key), want.key)
					if got != nil && got != want {
						t.Errorf("lookup(%v) returned the slot of %v", want.key, got.key)
						return
					}
					switch {
					case j == 1: // a churned slot may or may not be there
					case got == nil:
						missed.Add(1)
					default:
						found.Add(1)
					}
				}
			}
		})
	}
	for round := range 20 { // every round grows the index past 4096 buckets and shrinks it back
		sh.mu.Lock()
		for _, c := range churn {
			sh.insertLocked(hashPair(sh.seed, c.key), c)
		}
		sh.mu.Unlock()
		sh.mu.Lock()
		for _, c := range churn {
			require.True(t, sh.unlinkLocked(hashPair(sh.seed, c.key), c), "round %d", round)
		}
		sh.mu.Unlock()
	}
	close(stop)
	wg.Wait()
	for _, s := range stay {
		require.Same(t, s, sh.lookup(hashPair(sh.seed, s.key), s.key))
	}
	t.Logf("lock-free lookups of resident slots during churn: %d found, %d missed (Manager.hit then looks under the lock)", found.Load(), missed.Load())
	assert.Positive(t, found.Load())
}

// A lease taken by a lock-free hit and a retirement race on one atomic word:
// either the lease lands first (and the slot retires leased) or the hit sees
// the retirement and backs out. The count never drifts.
func TestLeaseRetireRace(t *testing.T) {
	for range 200 {
		var s slot
		var leased atomic.Bool
		var wg sync.WaitGroup
		wg.Go(func() {
			if stateOf(s.ctl.Add(1)) == stateLive {
				leased.Store(true)
				return
			}
			s.ctl.Add(^uint64(0))
		})
		_, retired := s.retire(stateRetired, true)
		wg.Wait()
		switch {
		case retired && leased.Load():
			t.Fatal("an idle-only retirement succeeded on a leased slot")
		case retired:
			assert.EqualValues(t, 0, s.leases())
			assert.Equal(t, stateRetired, s.state())
		default:
			assert.True(t, leased.Load())
			assert.EqualValues(t, 1, s.leases())
			assert.Equal(t, stateLive, s.state())
		}
	}
}

// A slot is at most 128 bytes, and what a hit touches is its first 64, right
// after the ids (see keyedSlot): a million pairs cost what
// BenchmarkMemoryPerPair says.
func TestSlotSize(t *testing.T) {
	assert.LessOrEqual(t, unsafe.Sizeof(slot{}), uintptr(128))
	var s slot
	assert.LessOrEqual(t, unsafe.Offsetof(s.shape)+unsafe.Sizeof(s.shape), uintptr(64), "the fields a hit and a release read are the slot's first 64 bytes")
}

// A shard is two whole cache lines, and what a hit touches is on the first,
// so shards in the pool's slice never share a line.
func TestShardLayout(t *testing.T) {
	var sh shard
	assert.EqualValues(t, 128, unsafe.Sizeof(sh))
	assert.LessOrEqual(t, unsafe.Offsetof(sh.seed)+unsafe.Sizeof(sh.seed), uintptr(64), "what a hit reads is on the first line")
	assert.GreaterOrEqual(t, unsafe.Offsetof(sh.slowAcquires), uintptr(64), "what is written is off the first line")
	for _, sh := range newPool(64).shards {
		assert.Zero(t, uintptr(unsafe.Pointer(sh))%64, "shards start on a cache line")
	}
}

// A cloned key equals its original, shares none of its memory, and holds
// both ids in one allocation, project right after user.
func TestKeyCloneOwnsOneAllocation(t *testing.T) {
	long := string(make([]byte, MaxIDLen))
	for _, k := range []pairKey{{"u", "p"}, {"alice@example.com", "proj-1"}, {long, long}} {
		c := k.clone()
		assert.Equal(t, k, c)
		assert.NotSame(t, unsafe.StringData(k.user), unsafe.StringData(c.user))
		assert.NotSame(t, unsafe.StringData(k.project), unsafe.StringData(c.project))
		assert.Equal(t, uintptr(unsafe.Pointer(unsafe.StringData(c.user)))+uintptr(len(c.user)), uintptr(unsafe.Pointer(unsafe.StringData(c.project))), "project follows user in one allocation")
	}
}

// A slot holds its pair's ids in its own allocation, user then project,
// ending where the slot starts, for every key length a pool can hold: one
// object per pair, and the ids cost at most 32 bytes over their length (the
// room is sized to fill a Go size class).
func TestSlotHoldsItsKeyInItsAllocation(t *testing.T) {
	id := strings.Repeat("x", MaxIDLen)
	sink := make([]*slot, 1024) // enough that another goroutine's allocation moves the mean by little
	for n := 0; n <= 2*MaxIDLen; n++ {
		u := (n + 1) / 2
		k := pairKey{strings.Clone(id[:u]), strings.Clone(id[:n-u])}
		s := allocSlot(k)
		require.Equal(t, k, s.key, "n=%d", n)
		start := uintptr(unsafe.Pointer(s)) - uintptr(n)
		if n > 1 { // an empty string's data pointer is unspecified
			assert.Equal(t, start, uintptr(unsafe.Pointer(unsafe.StringData(s.key.user))), "n=%d: the ids end where the slot starts", n)
			assert.Equal(t, start+uintptr(u), uintptr(unsafe.Pointer(unsafe.StringData(s.key.project))), "n=%d: the project id follows the user id", n)
		}

		assert.EqualValues(t, 1, testing.AllocsPerRun(10, func() { sink[0] = allocSlot(k) }), "n=%d", n)
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		for i := range sink {
			sink[i] = allocSlot(k)
		}
		runtime.ReadMemStats(&after)
		per := (after.TotalAlloc - before.TotalAlloc) / uint64(len(sink))
		assert.LessOrEqual(t, per, uint64(unsafe.Sizeof(slot{}))+uint64(n)+32, "n=%d: bytes per slot", n)
	}
}

// The hit whose add brings a slot's count to hitFold moves hitFold hits to
// the shard, so the 32-bit field never wraps, and the shard's total is
// unchanged by the move.
func TestHitCountFoldsIntoItsShard(t *testing.T) {
	sh := newPool(1).shards[0]
	s, h := testSlot(sh, "u")
	s.ctl.Store(uint64(hitFold-2) << hitShift)
	sh.mu.Lock()
	sh.insertLocked(h, s)
	sh.mu.Unlock()
	var m Manager
	for range 3 {
		require.True(t, m.tryHit(sh, s))
		m.unlease(s)
	}
	sh.mu.RLock()
	hits, leased := sh.hitsAndLeasesLocked()
	sh.mu.RUnlock()
	assert.EqualValues(t, hitFold+1, hits)
	assert.EqualValues(t, 0, leased)
	assert.EqualValues(t, 1, hitsOf(s.ctl.Load()), "the slot keeps what came after the fold")
	assert.EqualValues(t, hitFold, sh.hits)
	assert.Equal(t, stateLive, s.state())
}

// Hits racing a removal are counted exactly: those handed out before the
// swap to dead stay in the shard's count with the slot gone, and those after
// it take their add back. The count crosses hitFold while hits race, before
// the removal.
func TestHitsRacingRemovalAreCountedExactly(t *testing.T) {
	for range 50 {
		p := newPool(1)
		sh := p.shards[0]
		s, h := testSlot(sh, "u")
		const start = hitFold - 30
		s.ctl.Store(uint64(start) << hitShift)
		sh.mu.Lock()
		sh.insertLocked(h, s)
		sh.mu.Unlock()
		p.active.Add(1)
		var m Manager
		var served atomic.Int64
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() {
				for range 100 {
					if m.tryHit(sh, s) {
						served.Add(1)
						m.unlease(s)
					}
				}
			})
		}
		for served.Load() < 50 {
			runtime.Gosched()
		}
		require.True(t, p.detach(sh, s, stateDead, false))
		wg.Wait()
		sh.mu.RLock()
		hits, _ := sh.hitsAndLeasesLocked()
		sh.mu.RUnlock()
		require.EqualValues(t, start+served.Load(), hits, "hits handed out: %d", served.Load())
		require.EqualValues(t, 0, s.leases())
	}
}
