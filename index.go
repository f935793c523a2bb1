package sandboxpool

import (
	"math/bits"
	"sync/atomic"
)

// index is a shard's map from pair hash to slot: buckets of chains linked
// through slot.next. A memory hit reads it with atomic loads and takes no
// lock, so concurrent hits on one shard write no shared word (a hit counts
// itself in its slot); insert, unlink and resize run under shard.mu.
//
// A reader never returns a wrong slot: it compares the key. Its walk ends: a
// chain is only ever cut or prefixed, and a resize relinks slots into the new
// buckets in order, each pointing only at slots relinked before it, so a walk
// can only come back to a slot it passed if another resize ran meanwhile. A
// reader racing a writer may miss a slot that is there; Manager.hit then
// looks again under the lock before taking the slow path.
type index struct {
	shift   uint8 // the bucket of hash h is h >> shift: the top bits, since the low ones chose the shard
	buckets []atomic.Pointer[slot]
}

// minBuckets is the smallest index: an empty shard costs 64 bytes of buckets.
const minBuckets = 8

// newIndex returns an empty index of n buckets; n is a power of two.
func newIndex(n int) *index {
	return &index{shift: uint8(64 - bits.TrailingZeros(uint(n))), buckets: make([]atomic.Pointer[slot], n)}
}

func (ix *index) bucket(h uint64) *atomic.Pointer[slot] { return &ix.buckets[h>>ix.shift] }

// lookup returns k's slot, or nil. It is safe without shard.mu, and exact
// with it (read or write).
func (sh *shard) lookup(h uint64, k pairKey) *slot {
	for s := sh.idx.Load().bucket(h).Load(); s != nil; s = s.next.Load() {
		if s.key == k {
			return s
		}
	}
	return nil
}

// insertLocked puts s at the head of its chain, growing the index past one
// slot per bucket. Caller must hold sh.mu and have unlinked any slot of the
// same pair.
func (sh *shard) insertLocked(h uint64, s *slot) {
	ix := sh.idx.Load()
	b := ix.bucket(h)
	s.next.Store(b.Load())
	b.Store(s) // publishes s: its fields were set before
	if sh.n++; sh.n > len(ix.buckets) {
		sh.resizeLocked(2 * len(ix.buckets))
	}
}

// unlinkLocked removes s from its chain and reports whether it was there.
// The index halves when an eighth full, so a churned shard's buckets follow
// its live pairs (DESIGN guarantee 2) at amortised O(1) per unlink. Caller
// must hold sh.mu.
func (sh *shard) unlinkLocked(h uint64, s *slot) bool {
	ix := sh.idx.Load()
	for prev := ix.bucket(h); ; {
		cur := prev.Load()
		if cur == nil {
			return false
		}
		if cur == s {
			prev.Store(s.next.Load())
			s.next.Store(nil)
			break
		}
		prev = &cur.next
	}
	if sh.n--; len(ix.buckets) > minBuckets && sh.n <= len(ix.buckets)/8 {
		sh.resizeLocked(len(ix.buckets) / 2)
	}
	return true
}

// resizeLocked relinks every slot into a new index of n buckets and
// publishes it. Caller must hold sh.mu.
func (sh *shard) resizeLocked(n int) {
	old, ix := sh.idx.Load(), newIndex(n)
	for i := range old.buckets {
		for s := old.buckets[i].Load(); s != nil; {
			next := s.next.Load()
			b := ix.bucket(hashPair(sh.seed, s.key))
			s.next.Store(b.Load())
			b.Store(s)
			s = next
		}
	}
	sh.idx.Store(ix)
}

// eachLocked calls fn for every slot. Caller must hold sh.mu.
func (sh *shard) eachLocked(fn func(*slot)) {
	ix := sh.idx.Load()
	for i := range ix.buckets {
		for s := ix.buckets[i].Load(); s != nil; s = s.next.Load() {
			fn(s)
		}
	}
}
