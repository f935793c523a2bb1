package sandboxpool

import (
	"hash/maphash"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"
)

// Slot states. A slot only moves forward: live → retired → dead, or live → dead.
const (
	stateLive    uint32 = iota // in the pool, may be handed out
	stateRetired               // past MaxAge or replaced: never handed out again, ended at last release
	stateDead                  // removed or evicted: gone from the pool
)

// A slot's ctl word holds, from the top, the memory hits it has served (32
// bits), its state (2 bits) and its lease count (30 bits). A lock-free hit
// takes a lease, counts itself and learns the state in one atomic add, and a
// retirement can fail if a lease arrived first. Counting hits in the slot,
// whose line the lease writes anyway, means a hit writes no line that hits
// on other pairs write; a counter per shard was written by hits on all of
// the shard's pairs, from every CPU.
const (
	leaseBits = 30
	leaseMask = 1<<leaseBits - 1
	stateMask = 3 << leaseBits
	hitShift  = 32
	oneHit    = 1 << hitShift // a hit's share of its add: a lease is the other
	// hitFold is the count at which a hit moves its slot's hits to its
	// shard (see shard.foldHits), far below where the 32-bit field wraps.
	hitFold = 1 << 31
)

func stateOf(ctl uint64) uint32              { return uint32(ctl&stateMask) >> leaseBits }
func leasesOf(ctl uint64) int32              { return int32(ctl & leaseMask) }
func hitsOf(ctl uint64) int64                { return int64(ctl >> hitShift) }
func withState(ctl uint64, st uint32) uint64 { return ctl&^stateMask | uint64(st)<<leaseBits }

// slot is one pooled sandbox: 128 bytes, preceded in its allocation by its
// pair's ids (see keyedSlot). A lookup over a large pool is bound by cache
// misses, so everything a memory hit and a release touch (ctl, hitUntil,
// lastUse, the key a lookup compares, and the shape that names the
// Manager) fills the slot's first 64 bytes, right after the ids; what
// varies little between sandboxes (template, domain, envd version and URL)
// is interned in a shared shape. Fields written after the slot is published
// are atomics, or guarded as noted.
type slot struct {
	ctl      atomic.Uint64 // hits, state and lease count (see leaseBits)
	hitUntil atomic.Int64  // unix ns: a memory hit is allowed before it (see Manager.refreshHit)
	lastUse  atomic.Int64  // unix ns, coarse: creation, or the last release
	key      pairKey       // over the copy of the ids before the slot (see keyedSlot), never the caller's strings
	shape    *shape        // a release reads its Manager

	next      atomic.Pointer[slot] // the next slot in its index bucket (a hit on a chain's head does not read it); written under shard.mu
	deadline  atomic.Int64         // unix ns the provider (and Redis) currently hold as the deadline
	lastCheck atomic.Int64         // unix ns of the last successful probe, touch, connect or create
	createdAt int64                // unix ns; the slot is not handed out from createdAt+MaxAge on
	id        string
	token     Secret        // envd access token
	heapIdx   int32         // position in the reaper's heap, -1 when absent; guarded by reaper.mu
	flags     atomic.Uint32 // flagCounted | flagKilled | flagCreated | flagSuperseded | flagSuspect | flagTouchFailing
}

// state returns s's state.
func (s *slot) state() uint32 { return stateOf(s.ctl.Load()) }

// leases returns how many leases on s are held in this process.
func (s *slot) leases() int32 { return leasesOf(s.ctl.Load()) }

// retire moves s forward to state to (retired or dead), keeping its leases,
// and reports whether this call did, with the word it replaced. It fails if
// s is already dead or in state to, or (with onlyIdle) if s is leased: a
// lock-free hit that leased s before the swap wins.
func (s *slot) retire(to uint32, onlyIdle bool) (was uint64, ok bool) {
	for {
		w := s.ctl.Load()
		if st := stateOf(w); st == stateDead || st == to || (onlyIdle && leasesOf(w) > 0) {
			return w, false
		}
		if s.ctl.CompareAndSwap(w, withState(w, to)) {
			return w, true
		}
	}
}

// Slot flags.
const (
	flagCounted      uint32 = 1 << iota // holds a quota reservation, released once by forgetLocal
	flagKilled                          // killed, known gone, or left to its provider deadline: at most one kill per slot
	flagCreated                         // made by Provider.Create (not reconnected or adopted)
	flagSuperseded                      // Redis names another sandbox for the pair: left to its provider deadline
	flagSuspect                         // its latest probe found it unresponsive: in Manager.suspects
	flagTouchFailing                    // the reaper's latest push of its deadline failed (see Manager.retryTouchAt)
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
	key  pairKey       // the pair, cloned: the fill and the slot it makes keep no caller's memory
	done chan struct{} // closed when the fill has finished
	refs int           // guarded by shard.mu
	// Set before done is closed.
	finished bool // guarded by shard.mu
	s        *slot
	outcome  Outcome
	err      error
}

// shard is one partition of the pool, two cache lines long. The first is
// read-mostly: a memory hit reads the index pointer from it, and it stays
// cached on every CPU until a resize. The second holds what is written: the
// counters and the lock.
type shard struct {
	idx  atomic.Pointer[index] // read without the lock (see index)
	seed maphash.Seed          // the pool's, so a shard can hash a pair
	_    [48]byte

	slowAcquires atomic.Int64 // Acquires = memory hits + slowAcquires
	// mu serialises writers of idx (and every slot's next) and guards
	// flights, n and hits. It is never held across I/O: callers look up or
	// swap pointers under it and do provider and Redis calls after
	// unlocking.
	mu sync.RWMutex
	n  int // slots in idx
	// hits are the memory hits of slots that have left idx, and those
	// folded from slots still in it: the shard's memory hits are hits plus
	// the count in each slot of idx (see hitsAndLeasesLocked).
	hits    int64
	flights map[pairKey]*flight
	// peakFlights is the flights map's peak size since it was last rebuilt:
	// Go maps never give memory back, so a map that shrank to a quarter of
	// its peak is copied into a fresh one (see shrink).
	peakFlights int
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
	seed maphash.Seed
	mask uint64
	// shards are allocated one by one: a 128-byte object is 128-aligned,
	// while a []shard over 512 bytes starts 8 bytes into its allocation
	// (after the runtime's malloc header), so its shards would straddle
	// cache lines.
	shards []*shard

	active   atomic.Int64 // slots in the pool
	keyLocks atomic.Int64 // flights in the pool
}

func newPool(shards int) *pool {
	p := &pool{seed: maphash.MakeSeed(), mask: uint64(shards - 1), shards: make([]*shard, shards)}
	for i := range p.shards {
		p.shards[i] = &shard{seed: p.seed, flights: make(map[pairKey]*flight)}
		p.shards[i].idx.Store(newIndex(minBuckets))
	}
	return p
}

// hashPair hashes the two strings separately, so the hot path builds no
// joined key.
func hashPair(seed maphash.Seed, k pairKey) uint64 {
	return maphash.String(seed, k.user)*31 ^ maphash.String(seed, k.project)
}

// shard returns k's shard.
func (p *pool) shard(k pairKey) *shard { return p.shards[hashPair(p.seed, k)&p.mask] }

// get returns k's slot, if any, exactly: it looks under the lock, so no
// concurrent resize can hide it.
func (sh *shard) get(k pairKey) *slot {
	sh.mu.RLock()
	s := sh.lookup(hashPair(sh.seed, k), k)
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
		f = &flight{key: k.clone(), done: make(chan struct{}), refs: 1} // the fill's reference
		sh.flights[f.key] = f
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
	if old = sh.lookup(h, s.key); old != nil {
		sh.unlinkLocked(h, old)
	}
	sh.insertLocked(h, s)
	if old != nil {
		sh.retireLocked(old, stateRetired, false)
	} else {
		p.active.Add(1)
	}
	sh.mu.Unlock()
	return old
}

// detach takes s out of the pool if it is still there and moves it to state
// to (stateRetired or stateDead). It reports whether this call detached it.
// With onlyIdle, a leased slot is left alone.
func (p *pool) detach(sh *shard, s *slot, to uint32, onlyIdle bool) bool {
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if !sh.retireLocked(s, to, onlyIdle) {
		return false
	}
	if sh.unlinkLocked(hashPair(sh.seed, s.key), s) {
		p.active.Add(-1)
	}
	return true
}

// retireLocked retires s (see slot.retire) and, when s leaves the live
// state, keeps its memory hits in the shard's. The count in the word it
// replaced is exact: every hit that added before the swap saw s live and
// was handed out, and every hit after it sees s retired and takes its add
// back. Caller must hold sh.mu.
func (sh *shard) retireLocked(s *slot, to uint32, onlyIdle bool) bool {
	was, ok := s.retire(to, onlyIdle)
	if ok && stateOf(was) == stateLive {
		sh.hits += hitsOf(was)
	}
	return ok
}

// foldHits moves hitFold hits from s, still live, to its shard. The hit
// whose add brought s's count to hitFold calls it, so each crossing folds
// once (it checks again under the lock) and the count stays far from
// wrapping. Under sh.mu, a retirement (which keeps the whole count) and
// Stats (which adds the two) see the hits either in s or in the shard,
// never in both.
func (sh *shard) foldHits(s *slot) {
	sh.mu.Lock()
	if w := s.ctl.Load(); stateOf(w) == stateLive && hitsOf(w) >= hitFold {
		fold := uint64(hitFold) << hitShift
		s.ctl.Add(-fold)
		sh.hits += hitFold
	}
	sh.mu.Unlock()
}

// hitsAndLeasesLocked returns the shard's memory hits and its slots'
// leases. Caller must hold sh.mu (read or write).
func (sh *shard) hitsAndLeasesLocked() (hits, leased int64) {
	hits = sh.hits
	sh.eachLocked(func(s *slot) {
		w := s.ctl.Load()
		hits += hitsOf(w)
		leased += int64(leasesOf(w))
	})
	return hits, leased
}

// keyedSlot is a slot with room before it for its pair's ids: one
// allocation holds both, and the ids end where the slot starts. A hit reads
// one contiguous stretch, the ids it compares and then the slot's first 64
// bytes, instead of following the key to a second object: at 100k pairs in
// random order that was one more cache and TLB miss on every hit. R is a
// byte array sized so that keyedSlot fills a Go size class exactly (see
// allocSlot), so the ids cost what a separate copy of them would, without
// its object.
type keyedSlot[R any] struct {
	room R
	s    slot
}

// allocSlot returns a zero slot whose key is k, copied into the slot's own
// allocation (see keyedSlot). Pool keys are validated, so the ids fit the
// largest room (2 × MaxIDLen bytes); a longer key is cloned beside it.
func allocSlot(k pairKey) *slot {
	n := len(k.user) + len(k.project)
	for _, r := range rooms {
		if n <= r.size {
			return r.alloc(k)
		}
	}
	return &slot{key: k.clone()}
}

// rooms are the sizes of keyedSlot, smallest first. With a 128-byte slot,
// each fills a Go size class: 144, 160, … 256 bytes, then 288 … 384.
var rooms = [...]struct {
	size  int
	alloc func(pairKey) *slot
}{
	{16, withRoom[[16]byte]}, {32, withRoom[[32]byte]}, {48, withRoom[[48]byte]}, {64, withRoom[[64]byte]},
	{80, withRoom[[80]byte]}, // two 36-byte UUIDs
	{96, withRoom[[96]byte]}, {112, withRoom[[112]byte]}, {128, withRoom[[128]byte]},
	{160, withRoom[[160]byte]}, {192, withRoom[[192]byte]}, {224, withRoom[[224]byte]},
	{2 * MaxIDLen, withRoom[[2 * MaxIDLen]byte]},
}

// withRoom allocates a keyedSlot[R] and copies k to the end of its room,
// user then project, so the project id ends where the slot starts. The room
// is written only here, before the slot is published, so the strings over
// it are immutable like any other.
func withRoom[R any](k pairKey) *slot {
	ks := new(keyedSlot[R])
	room := unsafe.Slice((*byte)(unsafe.Pointer(&ks.room)), unsafe.Sizeof(ks.room))
	ids := room[len(room)-len(k.user)-len(k.project):]
	n := copy(ids, k.user)
	copy(ids[n:], k.project)
	ks.s.key = pairKey{unsafe.String(unsafe.SliceData(ids), n), unsafe.String(unsafe.SliceData(ids[n:]), len(k.project))}
	return &ks.s
}

// each calls fn for every pooled slot, a shard at a time under its lock:
// fn must not block.
func (p *pool) each(fn func(*slot)) {
	for _, sh := range p.shards {
		sh.mu.RLock()
		sh.eachLocked(fn)
		sh.mu.RUnlock()
	}
}
