package sandboxpool

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"

	"github.com/sony/gobreaker/v2"
)

// How the Manager logs:
//   - Warn: news an operator should act on or know of: a fault beginning
//     (an outage of Redis or of E2B, a revoked key, a Redis that refuses
//     writes or evicts keys), or one sandbox's own fault (hung, a call
//     failing alone among successes, a lost create lock).
//   - Info: the Manager's own changes of state: a fault's end (Redis
//     answers again, the breaker closes, the provider takes keepalives
//     again), a subscription restored, a canary the spell announced.
//   - Debug: each sandbox's lifecycle (evicted, past MaxAge, gone,
//     superseded, a duplicate retired, killed) and each sandbox's share
//     of a fault already announced. Stats count all of them.
//
// A fault that meets every sandbox is news once per Manager, not once per
// sandbox: a line per sandbox per keepalive, or per kill, or per Remove,
// floods the log when it is read most, and a line per sandbox at Info
// grows with the pool (a pool of 10,000 rotating at a 15-minute MaxAge
// would log 11 lines a second of "max age reached"). The soak checks it:
// each of its phases may log at most soakWarnsPerManager Warn lines per
// Manager.

const slogWarn = slog.LevelWarn

func attrErr(err error) slog.Attr { return slog.Any("error", err) }

// failureEpisode tells which failures of one kind of call are news. An
// outage or a revoked key makes every sandbox's call fail, then succeed
// again: logged one line per sandbox each way, 40 sandboxes (half in use,
// half idle) made 40 Warn lines at an E2B outage, then 20 Info lines
// (TestProviderOutageWarnsOnceNotPerSandbox). The first failure since a
// call succeeded is logged at Warn, the failures after it at Debug, and the
// success that ends them says at Info how many were quiet. A failure alone
// among successes is still a Warn of its own. Stats count every failure.
type failureEpisode struct {
	again string       // the Info line of the success that ends an episode; none if empty
	on    atomic.Bool  // a failure was logged at Warn, and no call has succeeded since
	quiet atomic.Int64 // failures logged at Debug in this episode
}

// failed returns the level of a failure's line: Warn if news (first, and
// no episode on), else Debug.
func (e *failureEpisode) failed(first bool) slog.Level {
	if first && e.on.CompareAndSwap(false, true) {
		e.quiet.Store(0)
		return slogWarn
	}
	e.quiet.Add(1)
	return slog.LevelDebug
}

// succeeded ends the episode, if one is on, and says so. The Load first
// keeps a success from writing the shared line while none is.
func (e *failureEpisode) succeeded(ctx context.Context, log *slog.Logger) {
	if !e.on.Load() || !e.on.CompareAndSwap(true, false) || e.again == "" {
		return
	}
	log.LogAttrs(ctx, slog.LevelInfo, e.again, slog.Int64("failures_logged_at_debug", e.quiet.Swap(0)))
}

// redisFailureLevel is the level of the line that reports one sandbox's
// (or one Remove's) Redis call failing with err. A failure of Redis itself
// is one of an episode (store.failing): Warn for the first since a call
// succeeded, Debug for the rest and for all while the breaker is open,
// since its change of state said so at Warn. Before, a Redis outage logged
// a line for every sandbox at every keepalive (202 of them in the soak's
// 6-second Redis restart, for 60 pairs on 4 Managers), and the first
// RedisTimeout of one, before the breaker opened, still 22. A Redis that
// refuses writes leaves the breaker closed: the first refused write of an
// episode of refusals is logged at Warn, the rest at Debug. An answer that
// is an error (a key of another type, a record that does not parse, a
// command the ACL refuses) is about one key or call: Warn.
func (m *Manager) redisFailureLevel(err error) slog.Level {
	switch {
	case refusesWrites(err):
		return m.store.refused.failed(true)
	case errors.Is(err, errRedisUnavailable):
		return m.store.failing.failed(!m.store.degraded())
	}
	return slogWarn
}

// breakerLevel is the level of the line that reports the Redis breaker's
// change of state from one to the other: Warn when it opens from closed,
// Info when it closes, Debug for its tries in between (to half-open, and
// back to open when a try fails), which a long outage repeats every
// cooldown. A Redis restart of 1 s logged 16 Warn lines on 4 Managers.
func breakerLevel(from, to gobreaker.State) slog.Level {
	switch {
	case to == gobreaker.StateOpen && from == gobreaker.StateClosed:
		return slogWarn
	case to == gobreaker.StateClosed:
		return slog.LevelInfo
	}
	return slog.LevelDebug
}
