package sandboxpool

import (
	"hash/maphash"
	"sync"
	"sync/atomic"
	"time"
)

// Slot states. A slot only moves forward: live → retired → dead, or live → dead.
const (
	stateLive    int32 = iota // in the pool, may be handed out
	stateRetired              // past MaxAge or replaced: never handed out again, killed at last release
	stateDead                 // removed or evicted: gone from the pool
)

// slot is one pooled sandbox, in one 128-byte allocation. A lookup over a
// large pool is bound by cache misses, so what a memory hit and a release
// touch (state, leases, hitUntil, lastUse) sits in the first 24 bytes, on one
// cache line; what varies little between sandboxes (template, domain, envd
// version and URL) is interned in a shared shape. Fields written after the
// slot is published are atomics, or guarded as noted.
type slot struct {
	state    atomic.Int32
	leases   atomic.Int32
	hitUntil atomic.Int64 // unix ns: a memory hit is allowed before it (see Manager.refreshHit)
	lastUse  atomic.Int64 // unix ns, coarse: creation, or the last release

	deadline  atomic.Int64 // unix ns the provider (and Redis) currently hold as the deadline
	lastCheck atomic.Int64 // unix ns of the last successful probe, touch, connect or create
	createdAt int64        // unix ns; the slot is not handed out from createdAt+MaxAge on
	key       pairKey
	id        string
	token     Secret // envd access token
	shape     *shape
	next      *slot         // the next slot whose pair hash is the same; guarded by shard.mu
	heapIdx   int32         // position in the reaper's heap, -1 when absent; guarded by reaper.mu
	flags     atomic.Uint32 // flagCounted | flagKilled | flagCreated
}

// Slot flags.
const (
	flagCounted uint32 = 1 << iota // holds a quota reservation, released once by forgetLocal
	flagKilled                     // killed, known gone, or left to its provider deadline: at most one kill per slot
	flagCreated                    // made by Provider.Create (not reconnected or adopted)
)

// setFlag sets f and reports whether this call set it.
func (s *slot) setFlag(f uint32) bool { return s.flags.Or(f)&f == 0 }

// clearFlag clears f and reports whether this call cleared it.
func (s *slot) clearFlag(f uint32) bool { return s.flags.And(^f)&f != 0 }

func (s *slot) hasFlag(f uint32) bool { return s.flags.Load()&f != 0 }

// shape is what sandboxes made alike have in common, and the Manager that
// holds them. The Manager interns shapes, so a million pooled sandboxes of
// one template hold one copy.
type shape struct {
	m                                      *Manager
	template, domain, envdVersion, envdURL string
}

// sandbox rebuilds the Sandbox value handed to callers. It allocates nothing.
func (s *slot) sandbox() Sandbox {
	return Sandbox{ID: s.id, User: s.key.user, Project: s.key.project, Template: s.shape.template,
		Domain: s.shape.domain, EnvdVersion: s.shape.envdVersion, AccessToken: s.token,
		CreatedAt: time.Unix(0, s.createdAt), envdURL: s.shape.envdURL}
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
	// mu protects slots, flights and every slot's next. It is never held
	// across I/O: callers look up or swap pointers under it and do provider
	// and Redis calls after unlocking.
	mu sync.RWMutex
	// slots maps a pair's hash to its slot; pairs whose hashes collide are
	// chained through slot.next. A uint64 key keeps an entry at 16 bytes (a
	// pairKey would take 40) and compares without reading the strings; the
	// slot, which a lookup reads anyway, holds the key that decides.
	slots   map[uint64]*slot
	flights map[pairKey]*flight
	seed    maphash.Seed // the pool's, so a shard can hash a pair
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
func shrink[K comparable, V any](m map[K]V, peak *int) map[K]V {
	if n := len(m); n > *peak {
		*peak = n
	} else if *peak >= minShrink && n <= *peak/4 {
		fresh := make(map[K]V, n)
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
		p.shards[i].seed = p.seed
		p.shards[i].slots = make(map[uint64]*slot)
		p.shards[i].flights = make(map[pairKey]*flight)
	}
	return p
}

// hashPair hashes the two strings separately, so the hot path builds no
// joined key.
func hashPair(seed maphash.Seed, k pairKey) uint64 {
	return maphash.String(seed, k.user)*31 ^ maphash.String(seed, k.project)
}

// shard returns k's shard.
func (p *pool) shard(k pairKey) *shard { return &p.shards[hashPair(p.seed, k)&p.mask] }

// lookupLocked returns k's slot. Caller must hold sh.mu (read or write).
func (sh *shard) lookupLocked(h uint64, k pairKey) *slot {
	for s := sh.slots[h]; s != nil; s = s.next {
		if s.key == k {
			return s
		}
	}
	return nil
}

// insertLocked puts s at the head of its hash chain. Caller must hold sh.mu
// and have unlinked any slot of the same pair.
func (sh *shard) insertLocked(h uint64, s *slot) {
	s.next = sh.slots[h]
	sh.slots[h] = s
}

// unlinkLocked removes s from its hash chain and reports whether it was
// there. Caller must hold sh.mu.
func (sh *shard) unlinkLocked(h uint64, s *slot) bool {
	for prev, cur := (*slot)(nil), sh.slots[h]; cur != nil; prev, cur = cur, cur.next {
		if cur != s {
			continue
		}
		switch {
		case prev != nil:
			prev.next = s.next
		case s.next != nil:
			sh.slots[h] = s.next
		default:
			delete(sh.slots, h)
		}
		s.next = nil
		return true
	}
	return false
}

// hit leases k's slot if it can be handed out with no I/O: live and before
// its hitUntil (younger than MaxAge, provider deadline not imminent, checked
// within HealthCheckAfter). It allocates nothing and writes only the lease
// count: the idle clock is written when the lease ends.
func (sh *shard) hit(h uint64, k pairKey, now int64) *slot {
	sh.mu.RLock()
	s := sh.lookupLocked(h, k)
	if s == nil || s.state.Load() != stateLive || now >= s.hitUntil.Load() {
		sh.mu.RUnlock()
		return nil
	}
	s.leases.Add(1) // under the read lock: detach (write lock) sees it
	sh.mu.RUnlock()
	return s
}

// leaseSlot leases s if it is still its pair's live slot (after a fill validated it).
func (sh *shard) leaseSlot(s *slot) bool {
	sh.mu.RLock()
	defer sh.mu.RUnlock()
	if sh.lookupLocked(hashPair(sh.seed, s.key), s.key) != s || s.state.Load() != stateLive {
		return false
	}
	s.leases.Add(1)
	return true
}

// get returns k's slot, if any.
func (sh *shard) get(k pairKey) *slot {
	sh.mu.RLock()
	s := sh.lookupLocked(hashPair(sh.seed, k), k)
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
	h := hashPair(sh.seed, s.key)
	sh.mu.Lock()
	if old = sh.lookupLocked(h, s.key); old != nil {
		sh.unlinkLocked(h, old)
	}
	sh.insertLocked(h, s)
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
	if sh.unlinkLocked(hashPair(sh.seed, s.key), s) {
		p.active.Add(-1)
		sh.slots = shrink(sh.slots, &sh.peakSlots)
	}
	return true
}
