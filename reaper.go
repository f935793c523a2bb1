package sandboxpool

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
)

const (
	// reapParallelism bounds the provider and Redis calls one reaper tick
	// runs at once: enough to drain a burst of expiries quickly, few enough
	// not to trip the provider's rate limits.
	reapParallelism = 16
	// visitTimeout bounds one visit's I/O (a touch, a Redis check).
	visitTimeout = 10 * time.Second
	// minTimeout is the shortest timeout sent to the provider: E2B counts
	// whole seconds and refuses 0.
	minTimeout = int64(time.Second)
)

// reaper keeps every pooled slot in a min-heap ordered by the time it next
// needs attention: its idle or max-age deadline, or the moment its provider
// deadline must be pushed. A tick pops only what is due, so its cost is
// proportional to what expires, not to the pool's size.
type reaper struct {
	mu sync.Mutex // protects h and every slot's heapIdx; never held across I/O
	h  dueHeap
}

func newReaper() *reaper { return &reaper{} }

// schedule sets s's next visit to due (unix ns).
func (r *reaper) schedule(s *slot, due int64) {
	r.mu.Lock()
	if s.heapIdx >= 0 {
		r.h.fix(int(s.heapIdx), due)
	} else {
		r.h.push(s, due)
	}
	r.mu.Unlock()
}

func (r *reaper) unschedule(s *slot) {
	r.mu.Lock()
	if s.heapIdx >= 0 {
		r.h.remove(int(s.heapIdx))
	}
	r.mu.Unlock()
}

// popDue removes and returns the slots due at or before now.
func (r *reaper) popDue(now int64) []*slot {
	r.mu.Lock()
	defer r.mu.Unlock()
	var due []*slot
	for len(r.h) > 0 && r.h[0].due <= now {
		due = append(due, r.h.remove(0))
	}
	return due
}

func (r *reaper) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.h)
}

// dueHeap is a binary min-heap of slots by due time. Entries carry the due
// time, so ordering reads no slot, and each slot knows its index (heapIdx),
// so rescheduling and removal cost O(log n). It is typed rather than built
// on container/heap, whose interface{} entries would allocate per push.
type dueHeap []heapEntry

type heapEntry struct {
	due int64 // unix ns
	s   *slot
}

func (h dueHeap) swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].s.heapIdx, h[j].s.heapIdx = int32(i), int32(j)
}

func (h dueHeap) up(i int) {
	for i > 0 {
		p := (i - 1) / 2
		if h[p].due <= h[i].due {
			return
		}
		h.swap(i, p)
		i = p
	}
}

// down sifts entry i down and reports whether it moved.
func (h dueHeap) down(i int) bool {
	start, n := i, len(h)
	for {
		c := 2*i + 1
		if c >= n {
			break
		}
		if r := c + 1; r < n && h[r].due < h[c].due {
			c = r
		}
		if h[i].due <= h[c].due {
			break
		}
		h.swap(i, c)
		i = c
	}
	return i > start
}

func (h *dueHeap) push(s *slot, due int64) {
	s.heapIdx = int32(len(*h))
	*h = append(*h, heapEntry{due: due, s: s})
	h.up(len(*h) - 1)
}

func (h dueHeap) fix(i int, due int64) {
	h[i].due = due
	if !h.down(i) {
		h.up(i)
	}
}

// remove takes entry i out and returns its slot. A heap shrunk to a quarter
// of its capacity is copied, so a churned pool gives the memory back.
func (h *dueHeap) remove(i int) *slot {
	old := *h
	n := len(old) - 1
	s := old[i].s
	if i != n {
		old.swap(i, n)
		if !old[:n].down(i) {
			old[:n].up(i)
		}
	}
	old[n] = heapEntry{}
	s.heapIdx = -1
	*h = old[:n]
	if c := cap(old); c >= 2*minShrink && n <= c/4 {
		*h = append(make(dueHeap, 0, 2*n), old[:n]...)
	}
	return s
}

// reapLoop runs reaper ticks until Close.
func (m *Manager) reapLoop() {
	t := time.NewTicker(m.cfg.ReapInterval)
	defer t.Stop()
	for {
		select {
		case <-m.done:
			return
		case <-t.C:
			m.reapOnce()
		}
	}
}

// reapOnce visits every slot that is due, in parallel up to reapParallelism.
func (m *Manager) reapOnce() {
	now := m.clock.precise()
	due := m.reaper.popDue(now)
	if len(due) == 0 {
		return
	}
	var g errgroup.Group
	g.SetLimit(reapParallelism)
	for _, s := range due {
		g.Go(func() error {
			ctx, cancel := context.WithTimeout(m.baseCtx, visitTimeout)
			defer cancel()
			m.visit(ctx, s, now)
			return nil
		})
	}
	_ = g.Wait() // visits report through stats and the logger
}

// idleDeadline is min(lastUse + IdleTimeout, createdAt + MaxAge).
func (m *Manager) idleDeadline(s *slot) int64 {
	return min(s.lastUse.Load()+int64(m.cfg.IdleTimeout), m.expiresAt(s))
}

// touchLead is how long before the provider deadline memory hits stop
// (refreshHit), so that a lease taken after the reaper's last visit before
// the deadline goes through a fill that pushes it: a quarter of IdleTimeout
// leaves several reap ticks and retries before the provider acts.
func (m *Manager) touchLead() int64 { return int64(m.cfg.IdleTimeout / 4) }

// visitLead is how long before the provider deadline the reaper first
// visits a slot to push the deadline if the slot was used: two ticks before
// memory hits would stop, so a pair in use never reaches that point. It
// stays under 1.5 touchLead, so a keepalive push (2 touchLead ahead) always
// leaves the next visit in the future.
func (m *Manager) visitLead() int64 {
	return m.touchLead() + min(2*int64(m.cfg.ReapInterval), m.touchLead()/2)
}

// nextVisit is when the reaper must next look at s: visitLead before its
// provider deadline (to push it if s was used), else touchLead before it
// (the last visit before memory hits stop: any lease taken until then is
// seen), else at the deadline itself; or at MaxAge, or at its idle deadline
// if it is unleased, whichever is first.
func (m *Manager) nextVisit(s *slot, now int64) int64 {
	dl := s.deadline.Load()
	next := dl - m.visitLead()
	if next <= now {
		next = dl - m.touchLead()
	}
	if next <= now {
		next = dl
	}
	return m.dueBy(s, now, next)
}

// dueBy is next, or s's MaxAge (while it is live) or its idle deadline
// (while it is unleased) if either comes first; a time that has passed by
// now becomes the next tick.
func (m *Manager) dueBy(s *slot, now, next int64) int64 {
	if exp := m.expiresAt(s); s.state() == stateLive && exp > now {
		next = min(next, exp)
	}
	if s.leases() == 0 {
		next = min(next, m.idleDeadline(s))
	}
	if next <= now {
		next = now + int64(m.cfg.ReapInterval)
	}
	return next
}

// visit enforces s's deadlines: it evicts an idle slot, retires one past
// MaxAge, and pushes the provider (and Redis) deadline of one in use.
func (m *Manager) visit(ctx context.Context, s *slot, now int64) {
	sh := m.pool.shard(s.key)
	switch s.state() {
	case stateDead:
		return
	case stateLive:
		if now >= m.expiresAt(s) {
			if m.pool.detach(sh, s, stateRetired, false) {
				m.ctr.evictions.Add(1)
				m.log.LogAttrs(ctx, slog.LevelDebug, "sandboxpool: max age reached", slog.String("sandbox", s.id))
			}
		}
	}
	leased := s.leases() > 0
	if s.state() == stateRetired && !leased {
		m.endRetired(ctx, s, "max age reached")
		return
	}
	target := m.keepaliveTarget(s, now)
	if !leased {
		target = m.idleDeadline(s)
		if target <= now {
			switch rd := m.remoteDeadline(ctx, s); {
			case rd > now: // used on another instance: its idle clock wins
				s.lastUse.Store(rd - int64(m.cfg.IdleTimeout))
				s.deadline.Store(rd)
				m.refreshHit(s)
				m.reaper.schedule(s, m.nextVisit(s, now))
				return
			case rd == recordUnknown: // Redis unreachable: another instance may be using it, so
				// drop it from memory without killing; its provider deadline reaps it.
				if m.pool.detach(sh, s, stateDead, true) {
					m.ctr.evictions.Add(1)
					s.setFlag(flagKilled)
					m.forgetLocal(s)
				}
				return
			case rd == recordSuperseded: // a duplicate another instance may still lease
				m.supersede(ctx, s)
				return
			}
			if m.pool.detach(sh, s, stateDead, true) {
				m.ctr.evictions.Add(1)
				m.log.LogAttrs(ctx, slog.LevelDebug, "sandboxpool: idle sandbox evicted", slog.String("sandbox", s.id))
				if m.store != nil {
					// Not killed: its provider deadline, which only a
					// keepalive pushes past our idle deadline, reaps it now
					// anyway, and a kill could hit a sandbox another instance
					// took up after Redis lost the record (before that
					// instance's keepalive wrote it again).
					s.setFlag(flagKilled)
					m.forget(ctx, s)
					return
				}
				m.killAndForget(ctx, s, "idle")
				return
			}
			target = m.keepaliveTarget(s, now) // leased meanwhile
		}
	}
	if dl := s.deadline.Load(); target > dl && dl-now <= m.touchAhead {
		if err := m.touchTo(ctx, s, now, target); err != nil {
			if errors.Is(err, ErrSandboxNotFound) {
				if m.pool.detach(sh, s, stateDead, false) {
					m.log.LogAttrs(ctx, slog.LevelDebug, "sandboxpool: sandbox gone", slog.String("sandbox", s.id))
				}
				m.forget(ctx, s)
				return
			}
			m.log.LogAttrs(ctx, m.providerFailing.failed(s.setFlag(flagTouchFailing)), "sandboxpool: extending deadline failed; retrying", slog.String("sandbox", s.id), slog.Any("error", err))
			m.reaper.schedule(s, m.retryTouchAt(s, now, dl))
			return
		}
		if s.hasFlag(flagSuperseded) && s.leases() == 0 {
			return // the touch found it superseded, and supersede ended it
		}
	}
	m.reaper.schedule(s, m.nextVisit(s, now))
}

// retryTouchAt is when the reaper tries again to push s's provider
// deadline dl after a push failed at now: a quarter of the way to dl, or
// once dl has passed a quarter of the time since it, at least ReapInterval
// and at most touchLead apart, and no later than s's MaxAge or (unleased)
// its idle deadline. Tries thin out while the provider refuses (an outage,
// a revoked key) and gather where they matter, before dl; retried every
// ReapInterval, each leased sandbox made a call a second (200 leased
// sandboxes, 15,600 calls and as many Warn lines in 5 minutes of a 401,
// TestKeepaliveBacksOffWhileTheProviderRefuses). The first try comes at
// least touchLead before dl (see visitLead), so its retry still comes at
// least IdleTimeout/8 before it (TestSlowestReapIntervalKeepsASandboxInUse).
func (m *Manager) retryTouchAt(s *slot, now, dl int64) int64 {
	away := dl - now
	if away < 0 {
		away = -away
	}
	return m.dueBy(s, now, now+min(max(away/retryTouchDivisor, int64(m.cfg.ReapInterval)), m.touchLead()))
}

// retryTouchDivisor sets retryTouchAt's pace: from visitLead (77 s at the
// defaults) before the deadline, about 15 tries reach it, where a try every
// ReapInterval made 77; past it the gaps grow by a quarter a try.
const retryTouchDivisor = 4

// keepaliveTarget is the provider deadline pushed for a leased slot: the
// aligned deadline while that is comfortably ahead, else two touch leads
// ahead, so use never ends early, and a slot released after MaxAge (or
// retired, so never leased again) is not left with a provider deadline far
// beyond its last lease.
func (m *Manager) keepaliveTarget(s *slot, now int64) int64 {
	if s.state() != stateLive {
		return now + 2*m.touchLead()
	}
	return max(min(now+int64(m.cfg.IdleTimeout), m.expiresAt(s)), now+2*m.touchLead())
}

// touch pushes the deadline of a slot about to be handed out (within
// touchLead of its deadline) as a keepalive would: the lease it is about to
// get may start after the reaper's last visit before that deadline.
func (m *Manager) touch(ctx context.Context, s *slot, now int64) error {
	return m.touchTo(ctx, s, now, m.keepaliveTarget(s, now))
}

// touchTo sets the Redis expiry and the provider deadline of s to target.
// Redis goes first, because it may answer that s is superseded: then only
// this instance's own leases still need s, and an unleased s is not
// extended at all, a leased one only by the keepalive of a retired slot.
// (If the provider call then fails, the Redis deadline is ahead of the
// provider's until the reaper's retry; a definitive not-found forgets s and
// its record.)
func (m *Manager) touchTo(ctx context.Context, s *slot, now, target int64) error {
	if m.cacheTouch(ctx, s, target) {
		if s.leases() == 0 {
			return nil
		}
		target = min(target, m.keepaliveTarget(s, now))
	}
	// The provider takes a timeout relative to its receipt: measure it from
	// now, after the Redis call, not from the visit's start, or the deadline
	// overshoots by that delay.
	if err := m.provider.SetTimeout(ctx, s.id, time.Duration(max(target-m.clock.precise(), minTimeout))); err != nil {
		if !errors.Is(err, ErrSandboxNotFound) {
			m.ctr.touchErrors.Add(1)
		}
		return err
	}
	m.ctr.touches.Add(1)
	s.deadline.Store(target)
	m.refreshHit(s)
	m.providerFailing.succeeded(ctx, m.log)
	if s.clearFlag(flagTouchFailing) {
		m.log.LogAttrs(ctx, slog.LevelDebug, "sandboxpool: deadline extended again", slog.String("sandbox", s.id))
	}
	return nil
}
