package sandboxpool

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/bsm/redislock"
)

// lockRetry is the pause between attempts to take a pair's create lock
// while another instance holds it: short next to a sandbox create (~1 s),
// so a waiter adopts the winner's sandbox promptly.
const lockRetry = 25 * time.Millisecond

// pairLock is a held per-pair create lock in Redis (redislock), refreshed
// every LockTTL/3 until released, so a holder that dies frees the pair
// within LockTTL, and a live one loses it to expiry only if Redis fails
// two refreshes in a row.
type pairLock struct {
	lock *redislock.Lock
	stop chan struct{}
	wg   sync.WaitGroup
}

// obtainLock waits for the pair's lock, as long as ctx allows, and takes it
// with token. Each attempt is one Redis call, bounded by RedisTimeout like
// every other: a stalled Redis fails it in RedisTimeout, not in the whole
// wait.
func (m *Manager) obtainLock(ctx context.Context, k pairKey, token string) (*pairLock, error) {
	for {
		l, err := m.tryLock(ctx, k, token)
		switch {
		case err != nil:
			return nil, err
		case l != nil:
			pl := &pairLock{lock: l, stop: make(chan struct{})}
			pl.wg.Add(1)
			go pl.refresh(ctx, m, m.cfg.LockTTL)
			return pl, nil
		case !pause(ctx, lockRetry):
			return nil, fmt.Errorf("waiting for the create lock of %s/%s: %w", k.user, k.project, context.Cause(ctx))
		}
	}
}

// tryLock makes one attempt at the pair's lock with token. It returns no
// lock and no error when another instance holds it, or when ctx ended:
// neither is a Redis failure, and the breaker does not count it. A lock
// that already holds token is taken again (redislock's obtain script):
// an earlier attempt of the same create whose grant reached Redis but
// whose reply was lost (cut by RedisTimeout) does not keep the pair locked
// against its own create until LockTTL.
func (m *Manager) tryLock(ctx context.Context, k pairKey, token string) (l *redislock.Lock, err error) {
	err = m.store.do(ctx, func(call context.Context) (err error) {
		l, err = m.store.locker.Obtain(call, m.store.lockKey(k), m.cfg.LockTTL, &redislock.Options{Token: token})
		if errors.Is(err, redislock.ErrNotObtained) || ctx.Err() != nil {
			return nil
		}
		return err
	})
	return l, err
}

// unlock releases l, under its own RedisTimeout, with ctx's values only:
// the caller's ctx may have ended. Its turn may wait up to LockTTL, when
// l expires anyway. A lock that expired meanwhile (ErrLockNotHeld) needs
// nothing. When Close has cut the create short (the Manager's context is
// cancelled, and Close waits for the create to return), l is still
// released (see outlive), so the other instances need not wait out
// LockTTL for a create that ended; its turn then waits RedisTimeout at
// most.
func (m *Manager) unlock(ctx context.Context, l *redislock.Lock) {
	ttl, cancel := m.detached(ctx, m.cfg.LockTTL)
	defer cancel()
	ctx, cancelOutlive := m.outlive(ttl)
	defer cancelOutlive()
	_ = m.store.bounded(ctx, func(call context.Context) error { return l.Release(call) })
}

// publishIfLockFree takes the pair's lock if nobody holds it, publishes s
// under it and lets it go; it reports whether s was published. It is for a
// creator whose lock expired with nothing published in its place: nobody
// holding the lock means nobody else is creating, so its sandbox can still
// be the pair's, and killing it would only make the next caller wait for
// another create.
func (m *Manager) publishIfLockFree(ctx context.Context, s *slot, token string) bool {
	l, err := m.tryLock(ctx, s.key, token)
	if err != nil || l == nil {
		return false // held: someone else is creating
	}
	defer m.unlock(ctx, l)
	ok, err := m.store.publish(ctx, s, l.Token())
	return err == nil && ok
}

// pause waits d, and reports false if ctx ended first.
func pause(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// refresh extends the lock every ttl/3 until released, each call with
// ctx's values (the create's) but not its cancellation.
func (pl *pairLock) refresh(ctx context.Context, m *Manager, ttl time.Duration) {
	defer pl.wg.Done()
	t := time.NewTicker(ttl / 3)
	defer t.Stop()
	for {
		select {
		case <-pl.stop:
			return
		case <-t.C:
			// The turn may wait until the next refresh is due.
			tick, cancel := m.detached(ctx, ttl/3)
			err := m.store.bounded(tick, func(call context.Context) error { return pl.lock.Refresh(call, ttl, nil) })
			cancel()
			switch {
			case endedHere(err):
				// Our own calls kept Redis busy, or the call outlasted the wait
				// for the next tick: try again at that tick.
			case errors.Is(err, redislock.ErrNotObtained):
				// Lost (expired, and taken or not): Redis answered, and
				// publish will find out (it checks the token; Stats.LockLost).
				return
			case err != nil:
				// No answer: try again at the next tick, which comes before
				// the lock expires, so a blip (a stall, a dropped connection)
				// costs no lock. If Redis stays away, publish finds out.
				m.ctr.redisErrors.Add(1)
			}
		}
	}
}

// releaseLock stops refreshing and releases the lock (if still ours),
// with ctx's values.
func (m *Manager) releaseLock(ctx context.Context, pl *pairLock) {
	close(pl.stop)
	pl.wg.Wait()
	m.unlock(ctx, pl.lock) // ErrLockNotHeld: it expired, publish already knew
}
