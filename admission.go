package sandboxpool

import (
	"fmt"
	"sync"
	"time"
)

// admission decides whether a fresh create may proceed: the MaxSandboxes
// and MaxPerUser quotas and the per-user CreateLimit. Reuse never passes
// through it. This is the in-process implementation; with Redis the same
// checks run cluster-wide (see cache.go) and this one is the fallback while
// Redis is down.
type admission struct {
	maxTotal, maxPerUser int
	limit                RateLimit
	interval, burst      int64 // GCRA parameters, ns

	mu      sync.Mutex // protects the fields below; held for map updates only
	total   int
	perUser map[string]int   // users with live reservations; entries deleted at zero
	tat     map[string]int64 // GCRA theoretical arrival time per user
	sweepAt int              // sweep tat once it grows past this size
}

// minSweep is the tat map size below which sweeping is not worth it.
const minSweep = 1024

func newAdmission(cfg Config) *admission {
	a := &admission{
		maxTotal: cfg.MaxSandboxes, maxPerUser: cfg.MaxPerUser, limit: cfg.CreateLimit,
		perUser: make(map[string]int), tat: make(map[string]int64), sweepAt: minSweep,
	}
	if cfg.CreateLimit.enabled() {
		a.interval = int64(cfg.CreateLimit.interval())
		a.burst = int64(cfg.CreateLimit.Burst) * a.interval
	}
	return a
}

// reserve takes one create slot for user at time now, or says why not.
func (a *admission) reserve(user string, now int64) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.maxTotal > 0 && a.total >= a.maxTotal {
		return fmt.Errorf("%w: %d sandboxes alive (MaxSandboxes %d)", ErrQuotaExceeded, a.total, a.maxTotal)
	}
	if a.maxPerUser > 0 && a.perUser[user] >= a.maxPerUser {
		return fmt.Errorf("%w: user has %d sandboxes (MaxPerUser %d)", ErrQuotaExceeded, a.perUser[user], a.maxPerUser)
	}
	if a.interval > 0 {
		// GCRA: allow when the theoretical arrival time is within the
		// burst tolerance of now.
		tat := max(a.tat[user], now)
		if wait := tat + a.interval - a.burst - now; wait > 0 {
			return &RetryAfterError{Err: ErrRateLimited, RetryAfter: time.Duration(wait)}
		}
		a.tat[user] = tat + a.interval
		a.sweepLocked(now)
	}
	a.total++
	a.perUser[user]++
	return nil
}

// sweepLocked drops GCRA entries that no longer restrict anyone (their tat
// has passed). It runs only when the map has doubled since the last sweep,
// so its cost is amortised O(1) per reservation and the map stays bounded by
// twice the number of recently active users.
func (a *admission) sweepLocked(now int64) {
	if len(a.tat) < a.sweepAt {
		return
	}
	for u, t := range a.tat {
		if t <= now {
			delete(a.tat, u)
		}
	}
	a.sweepAt = max(minSweep, 2*len(a.tat))
}

// release returns a reservation (a failed create, or a sandbox gone).
func (a *admission) release(user string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.total--
	if n := a.perUser[user] - 1; n > 0 {
		a.perUser[user] = n
	} else {
		delete(a.perUser, user)
	}
}
