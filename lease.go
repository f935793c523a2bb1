package sandboxpool

import (
	"math"
	"sync/atomic"
)

// Lease is one holder's use of a pair's sandbox. While any lease on a
// sandbox is held, the sandbox is not reaped, and its deadlines are kept
// extended. Call Release when done.
//
// A Lease is never handed out twice, so Release is idempotent for as long as
// the holder keeps the pointer. Acquire is inlined into its caller, so a
// Lease that does not escape the caller's function (acquired, used and
// released there, as in an HTTP handler) lives on its stack: no allocation.
//
// A Lease never released keeps its sandbox in use for as long as the
// process lives: the sandbox is never evicted, and the keepalive extends its
// provider deadline past MaxAge too, since nothing tells a forgotten lease
// from a long one. Stats().Leased counts the leases held. Release in a
// defer right after the error check, or call Manager.Use, which releases
// for you.
type Lease struct {
	s        *slot // its shape names the Manager: a Lease is 16 bytes
	outcome  Outcome
	released atomic.Bool
}

// Sandbox returns the leased sandbox.
func (l *Lease) Sandbox() Sandbox { return l.s.sandbox() }

// Outcome says how Acquire got the sandbox.
func (l *Lease) Outcome() Outcome { return l.outcome }

// Reused reports whether the sandbox existed before this Acquire (it was
// not created for it).
func (l *Lease) Reused() bool { return l.outcome != OutcomeCreated }

// Recheck asks the Manager to check the sandbox before it hands it out
// again: call it when the sandbox failed you (its envd calls fail, say).
// The next Acquire of the pair in this process probes it, where a memory
// hit would trust a check up to HealthCheckAfter old (even one that is
// never due); a sandbox found gone is replaced, one found unresponsive is
// handled as ErrSandboxUnresponsive says, and one that answers is handed
// out as before. Recheck does not release the lease, does no I/O, and
// does not tell other instances. It is a no-op on a nil Lease. (Manager.Use
// rechecks for an fn whose error wraps ErrSandboxNotFound or
// ErrSandboxUnresponsive.)
func (l *Lease) Recheck() {
	if l != nil {
		l.s.shape.m.recheck(l.s)
	}
}

// uncheckedAt is the last check a Recheck leaves a slot with: so long ago
// that any HealthCheckAfter, up to MaxDuration, has passed since, yet far
// enough from math.MinInt64 that now minus it, and it plus MaxDuration,
// stay in range.
const uncheckedAt = math.MinInt64 / 4

// recheck makes the next Acquire of s probe it (see Lease.Recheck).
func (m *Manager) recheck(s *slot) {
	s.lastCheck.Store(uncheckedAt)
	m.refreshHit(s)
}

// Release ends the lease. It is idempotent, safe after Close, and a no-op
// on a nil Lease (what Acquire returns with an error), so a deferred
// Release written before the error check cannot panic.
func (l *Lease) Release() {
	if l != nil && l.released.CompareAndSwap(false, true) {
		l.s.shape.m.release(l.s)
	}
}

// tryLease takes a lease on s if it is live, in one atomic add that also
// reads the state, so a retirement cannot slip between the check and the
// lease. On a slot that is no longer live the add is undone as a release.
func (m *Manager) tryLease(s *slot) bool {
	_, ok := m.take(s, 1)
	return ok
}

// tryHit is tryLease for a memory hit: the same add also counts the hit in
// s (see leaseBits), and the hit that brings the count to hitFold folds it
// into the shard.
func (m *Manager) tryHit(sh *shard, s *slot) bool {
	w, ok := m.take(s, oneHit+1)
	if ok && hitsOf(w) == hitFold {
		sh.foldHits(s)
	}
	return ok
}

// take adds delta (a lease, and maybe a hit) to s's word and returns the
// sum, or takes the add back if s is no longer live.
func (m *Manager) take(s *slot, delta uint64) (uint64, bool) {
	w := s.ctl.Add(delta)
	if stateOf(w) != stateLive {
		m.drop(s, delta)
		return w, false
	}
	return w, true
}

// release ends one lease on s. The idle clock restarts here (before the
// count drops, so a reaper that sees no lease sees this use), not at
// acquisition: an unleased sandbox is idle from the end of its last use.
func (m *Manager) release(s *slot) {
	if now := m.clock.coarse(); s.lastUse.Load() != now { // the coarse clock ticks every 10 ms: skip redundant stores
		s.lastUse.Store(now)
	}
	m.unlease(s)
}

// unlease drops one lease on s.
func (m *Manager) unlease(s *slot) { m.drop(s, 1) }

// drop takes delta (a lease, and maybe a hit) back from s's word. Whoever
// drops the last lease on a retired slot (a release, or a take backing out)
// ends it.
func (m *Manager) drop(s *slot, delta uint64) {
	if uint32(s.ctl.Add(-delta)) == stateRetired<<leaseBits {
		m.endLater(s, "max age reached")
	}
}

// Outcome is how an Acquire was served, for metrics and logs.
type Outcome uint8

// The outcomes of Acquire.
const (
	OutcomeError     Outcome = iota // Acquire failed
	OutcomeMemoryHit                // in this process's pool (probed if due)
	OutcomeCacheHit                 // reconnected: found in Redis or adopted by metadata
	OutcomeCreated                  // a new sandbox
)

// String names the outcome: "error", "memory_hit", "cache_hit", "created".
func (o Outcome) String() string {
	switch o {
	case OutcomeMemoryHit:
		return "memory_hit"
	case OutcomeCacheHit:
		return "cache_hit"
	case OutcomeCreated:
		return "created"
	}
	return "error"
}
