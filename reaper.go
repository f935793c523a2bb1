package sandboxpool

import (
	"container/heap"
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
)

// reaper keeps every pooled slot in a min-heap ordered by the time it next
// needs attention: its idle or max-age deadline, or the moment its provider
// deadline must be pushed. A tick pops only what is due, so its cost is
// proportional to what expires, not to the pool's size.
type reaper struct {
	mu sync.Mutex // protects h; never held across I/O
	h  slotHeap
}

func newReaper() *reaper { return &reaper{} }

// schedule sets s's next visit to due (unix ns).
func (r *reaper) schedule(s *slot, due int64) {
	r.mu.Lock()
	s.due = due
	if s.heapIdx >= 0 {
		heap.Fix(&r.h, s.heapIdx)
	} else {
		heap.Push(&r.h, s)
	}
	r.mu.Unlock()
}

// scheduleEarlier moves s's visit to due only if that is earlier.
func (r *reaper) scheduleEarlier(s *slot, due int64) {
	r.mu.Lock()
	if s.heapIdx < 0 || due < s.due {
		s.due = due
		if s.heapIdx >= 0 {
			heap.Fix(&r.h, s.heapIdx)
		} else {
			heap.Push(&r.h, s)
		}
	}
	r.mu.Unlock()
}

func (r *reaper) unschedule(s *slot) {
	r.mu.Lock()
	if s.heapIdx >= 0 {
		heap.Remove(&r.h, s.heapIdx)
	}
	r.mu.Unlock()
}

// popDue removes and returns the slots due at or before now.
func (r *reaper) popDue(now int64) []*slot {
	r.mu.Lock()
	defer r.mu.Unlock()
	var due []*slot
	for len(r.h) > 0 && r.h[0].due <= now {
		due = append(due, heap.Pop(&r.h).(*slot))
	}
	return due
}

func (r *reaper) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.h)
}

type slotHeap []*slot

func (h slotHeap) Len() int           { return len(h) }
func (h slotHeap) Less(i, j int) bool { return h[i].due < h[j].due }
func (h slotHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].heapIdx, h[j].heapIdx = i, j
}
func (h *slotHeap) Push(x any) {
	s := x.(*slot)
	s.heapIdx = len(*h)
	*h = append(*h, s)
}
func (h *slotHeap) Pop() any {
	old := *h
	n := len(old)
	s := old[n-1]
	old[n-1] = nil
	s.heapIdx = -1
	*h = old[:n-1]
	if c := cap(old); c >= 2*minShrink && n-1 <= c/4 { // give a churned heap's memory back
		*h = append(make(slotHeap, 0, 2*(n-1)), old[:n-1]...)
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
	return min(s.lastUse.Load()+int64(m.cfg.IdleTimeout), s.expiresAt)
}

// touchLead is how long before the provider deadline the reaper visits a
// slot to push the deadline if the slot was used: a quarter of IdleTimeout
// leaves several reap ticks and retries before the provider acts.
func (m *Manager) touchLead() int64 { return int64(m.cfg.IdleTimeout / 4) }

// nextVisit is when the reaper must next look at s: touchLead before its
// provider deadline (to push it if s was used), or at the deadline itself,
// or at MaxAge, or at its idle deadline if it is unleased, whichever is first.
func (m *Manager) nextVisit(s *slot, now int64) int64 {
	dl := s.deadline.Load()
	next := dl - m.touchLead()
	if next <= now {
		next = dl
	}
	if s.state.Load() == stateLive && s.expiresAt > now {
		next = min(next, s.expiresAt)
	}
	if s.leases.Load() == 0 {
		next = min(next, m.idleDeadline(s))
	}
	if next <= now {
		next = now + int64(m.cfg.ReapInterval)
	}
	return next
}

// maybeTouch asks the reaper to push s's deadline soon when a hit finds it
// within touchAhead of the provider deadline. At most one request is queued
// per slot, so a hot pair costs one heap update per IdleTimeout/2.
func (m *Manager) maybeTouch(s *slot, now int64) {
	if s.deadline.Load()-now < m.touchAhead && !s.touching.Load() && s.touching.CompareAndSwap(false, true) {
		m.reaper.scheduleEarlier(s, now)
	}
}

// visit enforces s's deadlines: it evicts an idle slot, retires one past
// MaxAge, and pushes the provider (and Redis) deadline of one in use.
func (m *Manager) visit(ctx context.Context, s *slot, now int64) {
	defer s.touching.Store(false)
	sh := m.pool.shard(s.key)
	switch s.state.Load() {
	case stateDead:
		return
	case stateLive:
		if now >= s.expiresAt {
			if m.pool.detach(sh, s, stateRetired, false) {
				m.ctr.evictions.Add(1)
				m.log.LogAttrs(ctx, slog.LevelInfo, "sandboxpool: max age reached", slog.String("sandbox", s.sb.ID))
			}
		}
	}
	leased := s.leases.Load() > 0
	if s.state.Load() == stateRetired && !leased {
		m.killAndForget(ctx, s, "max age reached")
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
				m.reaper.schedule(s, m.nextVisit(s, now))
				return
			case rd < 0: // Redis unreachable: another instance may be using it, so
				// drop it from memory without killing; its provider deadline reaps it.
				if m.pool.detach(sh, s, stateDead, true) {
					m.ctr.evictions.Add(1)
					s.killed.Store(true)
					m.forgetLocal(s)
				}
				return
			}
			if m.pool.detach(sh, s, stateDead, true) {
				m.ctr.evictions.Add(1)
				m.log.LogAttrs(ctx, slog.LevelDebug, "sandboxpool: idle sandbox evicted", slog.String("sandbox", s.sb.ID))
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
					m.log.LogAttrs(ctx, slog.LevelInfo, "sandboxpool: sandbox gone", slog.String("sandbox", s.sb.ID))
				}
				m.forget(ctx, s)
				return
			}
			m.log.LogAttrs(ctx, slog.LevelWarn, "sandboxpool: extending deadline failed", slog.String("sandbox", s.sb.ID), slog.Any("error", err))
			m.reaper.schedule(s, now+int64(m.cfg.ReapInterval))
			return
		}
	}
	m.reaper.schedule(s, m.nextVisit(s, now))
}

// keepaliveTarget is the provider deadline pushed for a leased slot: the
// aligned deadline while that is comfortably ahead, else two touch leads
// ahead, so use never ends early, and a slot released after MaxAge is not
// left with a provider deadline far beyond it.
func (m *Manager) keepaliveTarget(s *slot, now int64) int64 {
	return max(min(now+int64(m.cfg.IdleTimeout), s.expiresAt), now+2*m.touchLead())
}

// touch pushes the deadline of a slot about to be handed out.
func (m *Manager) touch(ctx context.Context, s *slot, now int64) error {
	return m.touchTo(ctx, s, now, min(now+int64(m.cfg.IdleTimeout), max(s.expiresAt, now+int64(m.guard))))
}

// touchTo sets the provider deadline (and the Redis expiry) of s to target.
func (m *Manager) touchTo(ctx context.Context, s *slot, now, target int64) error {
	if err := m.provider.SetTimeout(ctx, s.sb.ID, time.Duration(target-now)); err != nil {
		return err
	}
	m.ctr.touches.Add(1)
	s.deadline.Store(target)
	m.cacheTouch(ctx, s, target)
	return nil
}
