package sandboxpool

import (
	"hash/maphash"
	"sync"
	"sync/atomic"
)

// Slot states. A slot only moves forward: live → retired → dead, or live → dead.
const (
	stateLive    int32 = iota // in the pool, may be handed out
	stateRetired              // past MaxAge or replaced: never handed out again, killed at last release
	stateDead                 // removed or evicted: gone from the pool
)

// slot is one pooled sandbox. Fields written after creation are atomics, so
// the hot path reads them under the shard's read lock only. A lookup over a
// large pool is bound by cache misses, so what a memory hit touches fits in
// one 64-byte cache line; everything else hangs off slotInfo.
type slot struct {
	state     atomic.Int32
	leases    atomic.Int32
	expiresAt int64        // createdAt + MaxAge: not handed out from then on
	deadline  atomic.Int64 // unix ns the provider (and Redis) currently hold as the deadline
	lastCheck atomic.Int64 // unix ns of the last successful probe, connect or create
	lastUse   atomic.Int64 // unix ns, coarse
	touching  atomic.Bool  // a touch is queued for the reaper
	sh        *shard       // the shard holding key, so Release need not hash
	*slotInfo
}

// slotInfo is the part of a slot the hot path does not touch.
type slotInfo struct {
	key       pairKey
	sb        Sandbox
	createdAt int64       // unix ns
	counted   atomic.Bool // holds a quota reservation, released once by forget
	killed    atomic.Bool // a kill was started; at most one per slot

	// origin is how the slot's last fill got it; written by the fill before
	// the flight completes, read by the flight's waiters after.
	origin Outcome

	// Reaper heap position and due time, guarded by reaper.mu.
	due     int64
	heapIdx int
}

// flight is the per-pair lock entry: at most one fill (probe, reconnect or
// create) runs per pair in this process, and every Acquire that misses the
// pool waits on it. It is reference-counted (the fill and each waiter hold a
// reference) and leaves the shard's map when the count reaches zero.
type flight struct {
	done chan struct{} // closed when the fill has finished
	refs int           // guarded by shard.mu
	// Set before done is closed.
	finished bool // guarded by shard.mu
	s        *slot
	outcome  Outcome
	err      error
}

// shard is one partition of the pool.
type shard struct {
	// mu protects slots and flights. It is never held across I/O: callers
	// look up or swap pointers under it and do provider and Redis calls
	// after unlocking.
	mu      sync.RWMutex
	slots   map[pairKey]*slot
	flights map[pairKey]*flight
	// Peak sizes since the maps were last rebuilt: Go maps never give
	// memory back, so a map that shrank to a quarter of its peak is copied
	// into a fresh one (see shrink).
	peakSlots, peakFlights int

	// Counters live beside the lock the hot path already writes, so
	// concurrent hits on different shards do not share a cache line.
	// Acquires = memoryHits + slowAcquires; Leased is summed by Stats.
	memoryHits   atomic.Int64
	slowAcquires atomic.Int64

	_ [64]byte // keep neighbouring shards off this shard's cache lines
}

// minShrink is the peak size below which a map is not worth rebuilding:
// small enough that an emptied pool keeps almost nothing.
const minShrink = 16

// shrink returns m, or a copy of it sized to its contents when it holds a
// quarter or less of *peak. Copying len(m) entries after at least
// 3·len(m) deletions costs amortised O(1) per deletion, and bounds a
// churned pool's memory by its live pairs (DESIGN guarantee 2).
func shrink[V any](m map[pairKey]V, peak *int) map[pairKey]V {
	if n := len(m); n > *peak {
		*peak = n
	} else if *peak >= minShrink && n <= *peak/4 {
		fresh := make(map[pairKey]V, n)
		for k, v := range m {
			fresh[k] = v
		}
		*peak = n
		return fresh
	}
	return m
}

// pool is the sharded in-memory map of pairs to slots.
type pool struct {
	seed   maphash.Seed
	mask   uint64
	shards []shard

	active   atomic.Int64 // slots in the pool
	keyLocks atomic.Int64 // flights in the pool
}

func newPool(shards int) *pool {
	p := &pool{seed: maphash.MakeSeed(), mask: uint64(shards - 1), shards: make([]shard, shards)}
	for i := range p.shards {
		p.shards[i].slots = make(map[pairKey]*slot)
		p.shards[i].flights = make(map[pairKey]*flight)
	}
	return p
}

// shard returns k's shard. Hashing the two strings separately avoids
// building a joined key on the hot path.
func (p *pool) shard(k pairKey) *shard {
	h := maphash.String(p.seed, k.user)*31 ^ maphash.String(p.seed, k.project)
	return &p.shards[h&p.mask]
}

// hit leases k's slot if it can be handed out with no I/O: live, younger than
// MaxAge, provider deadline not imminent and probed within probeAfter
// (probeAfter < 0 disables the skip). It allocates nothing.
func (sh *shard) hit(k pairKey, now, probeAfter, guard int64) *slot {
	sh.mu.RLock()
	s := sh.slots[k]
	if s == nil || s.state.Load() != stateLive || now >= s.expiresAt ||
		now >= s.deadline.Load()-guard || probeAfter < 0 || now-s.lastCheck.Load() >= probeAfter {
		sh.mu.RUnlock()
		return nil
	}
	s.leases.Add(1)
	sh.mu.RUnlock()
	if s.lastUse.Load() != now { // the coarse clock ticks every 10 ms: skip redundant stores
		s.lastUse.Store(now)
	}
	return s
}

// leaseSlot leases s if it is still k's live slot (after a fill validated it).
func (sh *shard) leaseSlot(s *slot, now int64) bool {
	sh.mu.RLock()
	ok := sh.slots[s.key] == s && s.state.Load() == stateLive
	if ok {
		s.leases.Add(1)
	}
	sh.mu.RUnlock()
	if ok {
		s.lastUse.Store(now)
	}
	return ok
}

// get returns k's slot, if any.
func (sh *shard) get(k pairKey) *slot {
	sh.mu.RLock()
	s := sh.slots[k]
	sh.mu.RUnlock()
	return s
}

// join returns the pair's running flight, or a new one (started == true)
// whose fill the caller must start. Either way the caller holds a reference.
func (p *pool) join(sh *shard, k pairKey) (f *flight, started bool) {
	sh.mu.Lock()
	defer sh.mu.Unlock()
	f = sh.flights[k]
	if f == nil || f.finished {
		if f == nil {
			p.keyLocks.Add(1)
		}
		// A finished flight still referenced by slow waiters is replaced:
		// its result is history, not an answer for a new arrival.
		f = &flight{done: make(chan struct{}), refs: 1} // the fill's reference
		sh.flights[k] = f
		sh.flights = shrink(sh.flights, &sh.peakFlights) // records the peak
		started = true
	}
	f.refs++
	return f, started
}

// leave drops one reference to f and frees the entry at zero.
func (p *pool) leave(sh *shard, k pairKey, f *flight) {
	sh.mu.Lock()
	p.unrefLocked(sh, k, f)
	sh.mu.Unlock()
}

// finish records the fill's result, drops the fill's reference and wakes the
// waiters.
func (p *pool) finish(sh *shard, k pairKey, f *flight, s *slot, o Outcome, err error) {
	sh.mu.Lock()
	f.s, f.outcome, f.err, f.finished = s, o, err, true
	p.unrefLocked(sh, k, f)
	sh.mu.Unlock()
	close(f.done)
}

// unrefLocked: caller must hold sh.mu.
func (p *pool) unrefLocked(sh *shard, k pairKey, f *flight) {
	f.refs--
	if f.refs == 0 && sh.flights[k] == f {
		delete(sh.flights, k)
		p.keyLocks.Add(-1)
		sh.flights = shrink(sh.flights, &sh.peakFlights)
	}
}

// put makes s the pair's slot and returns the slot it displaced, if any.
func (p *pool) put(sh *shard, s *slot) (old *slot) {
	sh.mu.Lock()
	old = sh.slots[s.key]
	sh.slots[s.key] = s
	if old != nil {
		old.state.CompareAndSwap(stateLive, stateRetired)
	} else {
		p.active.Add(1)
		sh.slots = shrink(sh.slots, &sh.peakSlots) // records the peak
	}
	sh.mu.Unlock()
	return old
}

// detach takes s out of the pool if it is still there and moves it to state
// to (stateRetired or stateDead). It reports whether this call detached it.
// With onlyIdle, a leased slot is left alone.
func (p *pool) detach(sh *shard, s *slot, to int32, onlyIdle bool) bool {
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if onlyIdle && s.leases.Load() > 0 {
		return false
	}
	cur := s.state.Load()
	if cur == stateDead || cur == to {
		return false
	}
	s.state.Store(to)
	if sh.slots[s.key] == s {
		delete(sh.slots, s.key)
		p.active.Add(-1)
		sh.slots = shrink(sh.slots, &sh.peakSlots)
	}
	return true
}
