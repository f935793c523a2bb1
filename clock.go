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

// clock gives unix-nanosecond time. With the real clock, coarse() is an
// atomic load refreshed by a ticker; with an injected clock (tests) it is the
// injected time, so tests never sleep.
type clock struct {
	now    func() time.Time
	real   bool
	cached atomic.Int64
}

func newClock(now func() time.Time, real bool) *clock {
	c := &clock{now: now, real: real}
	c.refresh()
	return c
}

func (c *clock) refresh() { c.cached.Store(c.now().UnixNano()) }

// coarse returns the time with up to clockResolution of staleness.
func (c *clock) coarse() int64 {
	if c.real {
		return c.cached.Load()
	}
	return c.now().UnixNano()
}

// precise returns the exact time (and refreshes the coarse reading).
func (c *clock) precise() int64 {
	n := c.now().UnixNano()
	if c.real {
		c.cached.Store(n)
	}
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
