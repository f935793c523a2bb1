package sandboxpool

import (
	"sync/atomic"
	"time"
)

// clockResolution is how stale the coarse clock may be. Reading time.Now()
// costs more than the whole hot-path lookup, so the hot path reads an atomic
// refreshed at this period instead. 10 ms is far below every timeout the
// pool enforces (seconds to minutes).
const clockResolution = 10 * time.Millisecond

const (
	// maxBackStep is the furthest back the real clock follows the system's
	// wall clock at once: far below the keepalive's lead (IdleTimeout/4,
	// at least 250 ms), whose time a step back would take from every
	// sandbox in use.
	maxBackStep = int64(100 * time.Millisecond)
	// slewDivisor: after a step back of the wall clock, the real clock runs
	// at (slewDivisor-1)/slewDivisor of real time until it has caught up.
	// A visit of the reaper then comes at most 11% of its wait late, and
	// the longest wait, about 3/4 of IdleTimeout, leaves the keepalive's
	// lead, 1/4 of it, enough to push the provider's deadline in time.
	slewDivisor = 10
)

// clock gives the Manager's time in unix nanoseconds. The real clock
// follows the system's wall clock, which the other instances and Redis
// share, forward at once and back by at most maxBackStep at once: it runs
// on the monotonic clock between readings, and after a larger step back
// it slows down (see slewDivisor) instead of stepping. Every deadline the
// Manager keeps in memory is an instant of this clock, and a step back of
// it would delay every keepalive by as much. A step back larger than
// maxSlew (the Manager's IdleTimeout) is followed at once all the same:
// the wall clock was far wrong, and slewing it would leave the instance
// ahead of the others for ten times as long, reading their records as
// older than they are and rotating the pairs it serves early; the
// sandboxes in use miss their keepalive once instead. With an injected
// clock (tests), coarse and precise read it as is, so tests never sleep.
type clock struct {
	now  func() time.Time // the injected clock, when not real
	real bool
	// source reads the real clock's inputs: the wall clock and the
	// monotonic time since the clock was made, in ns (replaced in tests).
	source  func() (wall, mono int64)
	start   int64 // the wall clock at creation, unix ns
	maxSlew int64 // ns: a larger step back is followed at once
	// offset is the real clock's time minus (its wall clock at creation
	// plus monotonic time): 0 while the wall clock has not stepped since,
	// and moved only by refresh.
	offset   atomic.Int64
	lastMono int64 // mono at the last refresh; only refresh touches it
	cached   atomic.Int64
}

// newClock returns the injected clock now, or with real the system's,
// read through source if it is not nil (tests), which slews steps back up
// to maxSlew.
func newClock(now func() time.Time, real bool, source func() (wall, mono int64), maxSlew time.Duration) *clock {
	c := &clock{now: now, real: real, source: source, maxSlew: int64(maxSlew)}
	if real {
		if c.source == nil {
			base := time.Now()
			c.source = func() (int64, int64) { t := time.Now(); return t.UnixNano(), int64(t.Sub(base)) }
		}
		c.start, c.lastMono = c.source()
	}
	c.refresh()
	return c
}

// refresh updates the coarse reading and, for the real clock, follows the
// wall clock (see clock). Only newClock, then the clock's own goroutine,
// call it.
func (c *clock) refresh() {
	if !c.real {
		c.cached.Store(c.now().UnixNano())
		return
	}
	wall, mono := c.source()
	offset, follow := c.offset.Load(), wall-c.start-mono
	if back := offset - follow; back <= maxBackStep || back > c.maxSlew {
		offset = follow
	} else {
		offset = max(offset-(mono-c.lastMono)/slewDivisor, follow)
	}
	c.offset.Store(offset)
	c.lastMono = mono
	c.cached.Store(c.start + mono + offset)
}

// coarse returns the time with up to clockResolution of staleness.
func (c *clock) coarse() int64 {
	if c.real {
		return c.cached.Load()
	}
	return c.now().UnixNano()
}

// precise returns the exact time (and refreshes the coarse reading).
func (c *clock) precise() int64 {
	if !c.real {
		return c.now().UnixNano()
	}
	_, mono := c.source()
	n := c.start + mono + c.offset.Load()
	c.cached.Store(n)
	return n
}

// run refreshes the coarse clock until done is closed.
func (c *clock) run(done <-chan struct{}) {
	if !c.real {
		return
	}
	t := time.NewTicker(clockResolution)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case <-t.C:
			c.refresh()
		}
	}
}
