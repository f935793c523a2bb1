package sandboxpool

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/semaphore"

	"github.com/sandboxpool/sandboxpool/e2b"
)

// Timing constants, each with its reason.
const (
	// hotGuard: a sandbox this close to MaxAge is not adopted or reconnected
	// (it would be retired almost at once); the new one is made instead.
	hotGuard = 2 * time.Second
	// checkTimeout bounds a liveness probe (Provider.Check). envd answers
	// its /health in milliseconds, E2B's API a detail in well under a
	// second; a probe still unanswered after ten seconds meets a sandbox
	// or a route that does not answer, and every Acquire of the pair waits
	// on it: it fails closed (the sandbox is kept), instead of holding the
	// pair until CreateTimeout while the client retries a request that
	// times out after a minute.
	checkTimeout = 10 * time.Second
	// killTimeout bounds a background kill (after the last release of a
	// retired sandbox, or an eviction); the provider's own deadline reaps
	// whatever a failed kill leaves.
	killTimeout = 30 * time.Second
	// workerIdle is how long a background worker waits for the next job
	// before it exits: long enough to carry a warm stack from one miss to
	// the next under steady traffic, short enough that the workers of a
	// burst of misses (one per concurrent fill) do not linger.
	workerIdle = time.Second
	// maxLeaseAttempts bounds how often Acquire retries when the sandbox a
	// fill produced is evicted or removed before the caller could lease it.
	maxLeaseAttempts = 3
	// redisRetry is the pause before a coordinated create tries again after
	// a Redis failure the breaker has not judged an outage (see create):
	// short next to a create, long enough not to add to a burst that may
	// have made the call time out.
	redisRetry = 50 * time.Millisecond
)

// Manager gives every (user, project) pair its own sandbox, reused across
// calls, shared safely between goroutines (and, with Redis, between
// processes) and destroyed on time. Build one with New; it is safe for
// concurrent use.
type Manager struct {
	cfg      Config
	provider Provider
	log      *slog.Logger
	clock    *clock
	pool     *pool
	reaper   *reaper
	admit    *admission
	store    *store // nil without Redis
	ctr      counters

	unpubMu     sync.Mutex
	unpublished map[*slot]struct{} // created while Redis was down; published on recovery

	suspects        suspects            // sandboxes found unresponsive, not yet condemned
	providerFailing failureEpisode      // which failed keepalives and kills are logged at Warn
	unannounced     unannounced         // removals Redis did not answer, made on recovery
	catchingUp      *semaphore.Weighted // one catchUp at a time: the probe's, or one of concurrent Closes'

	probeAfter int64 // ns; <0 = always probe
	guard      int64 // ns, hotGuard (at most IdleTimeout/4)
	touchAhead int64 // ns: a deadline closer than this is worth pushing (IdleTimeout/2)

	shapesMu sync.Mutex
	shapes   map[shape]*shape // interned slot shapes, at most maxShapes

	baseCtx context.Context // cancelled by Close when its ctx runs out
	cancel  context.CancelFunc
	done    chan struct{} // closed by Close: stops the background loops
	stopped chan struct{} // closed once every background goroutine has returned, after Close

	jobs chan func() // unbuffered: a send succeeds only when a worker is idle

	bgMu   sync.Mutex // protects closed transitions against bg.Add
	bg     sync.WaitGroup
	closed atomic.Bool
}

// New validates cfg, fills its defaults and starts the Manager's background
// work (the reaper and the coarse clock), which Close stops.
func New(cfg Config) (*Manager, error) {
	realClock := cfg.now == nil || cfg.clockSource != nil
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	m := &Manager{
		cfg:        cfg,
		provider:   cfg.Provider,
		log:        cfg.Logger,
		clock:      newClock(cfg.now, realClock, cfg.clockSource, cfg.IdleTimeout),
		pool:       newPool(cfg.Shards),
		reaper:     newReaper(),
		admit:      newAdmission(cfg),
		probeAfter: int64(cfg.HealthCheckAfter),
		guard:      int64(hotGuard),
		touchAhead: int64(cfg.IdleTimeout / 2),
		done:       make(chan struct{}),
		stopped:    make(chan struct{}),
		jobs:       make(chan func()),

		unpublished:     make(map[*slot]struct{}),
		suspects:        suspects{m: make(map[*slot]suspicion)},
		catchingUp:      semaphore.NewWeighted(1),
		providerFailing: failureEpisode{again: "sandboxpool: the provider takes keepalives and kills again"},
		shapes:          make(map[shape]*shape),
	}
	if m.guard > int64(cfg.IdleTimeout/4) {
		m.guard = int64(cfg.IdleTimeout / 4)
	}
	m.baseCtx, m.cancel = context.WithCancel(context.Background())
	m.goBackground(func() { m.clock.run(m.done) })
	if !cfg.manualReap {
		m.goBackground(m.reapLoop)
	}
	if cfg.Redis != nil {
		m.store = newStore(cfg, m.log, &m.ctr.redisErrors)
		m.goBackground(func() { m.probeLoop(cfg.probeInterval) })
		m.goBackground(m.removalLoop)
		m.goBackground(func() { m.checkEviction(cfg.probeInterval, cfg.evictionRecheck) })
	}
	return m, nil
}

// goBackground runs fn on a goroutine that Close waits for. It reports false,
// and does not run fn, once the Manager is closed.
//
// fn goes to an idle worker when there is one, else to a new worker. A fill
// runs go-redis, the breaker and the provider on deep stacks: a new
// goroutine grows and copies its stack several times on the way, and a
// worker kept from an earlier job has it already (until a collection finds
// it idle and shrinks it), which makes a miss faster by about a quarter of
// a Redis round trip (BenchmarkRedisPaths).
func (m *Manager) goBackground(fn func()) bool {
	if m.closed.Load() {
		return false
	}
	select {
	case m.jobs <- fn: // a worker was idle: it runs fn, and Close waits for it
		return true
	default:
	}
	if !m.enter() {
		return false
	}
	go m.worker(fn)
	return true
}

// worker runs fn, then whatever goBackground hands it, until it has been
// idle for workerIdle or the Manager closes. A job it received runs even
// if Close has begun: its sender was told it would, and Close waits.
func (m *Manager) worker(fn func()) {
	defer m.bg.Done()
	idle := time.NewTimer(m.cfg.workerIdle)
	defer idle.Stop()
	for {
		fn()
		idle.Reset(m.cfg.workerIdle)
		select {
		case fn = <-m.jobs:
		case <-idle.C:
			return
		case <-m.done:
			return
		}
	}
}

// Acquire returns a lease on the pair's sandbox, creating the sandbox if the
// pair has none. Concurrent Acquires for one pair share one sandbox and cause
// at most one create. If ctx ends first, Acquire returns its error, but a
// create already started finishes and is kept for the next Acquire. If ctx
// has already ended, Acquire returns its error and starts nothing, even
// for a pooled pair, as database/sql and pgxpool do. The work an Acquire
// starts (a create, or a reconnect) carries ctx's values, for tracing and
// logs, but not its cancellation or deadline (CreateTimeout bounds it).
func (m *Manager) Acquire(ctx context.Context, user, project string) (l *Lease, err error) {
	// This wrapper is kept small enough to be inlined into the caller, so
	// the Lease is allocated in the caller's frame: it stays on the stack,
	// and Acquire allocates nothing, unless the caller lets it escape
	// (TestMemoryHitAllocations fails if it stops being inlined).
	l = new(Lease)
	if err = m.acquire(ctx, l, user, project); err != nil {
		l = nil
	}
	return l, err
}

// acquire is Acquire's work: it leases the pair's slot into l (which it
// must not let escape, or every Lease would be heap-allocated).
func (m *Manager) acquire(ctx context.Context, l *Lease, user, project string) error {
	if m.closed.Load() {
		return ErrClosed
	}
	if ctx.Err() != nil { // not a lease, and above all no create started
		return endedErr(ctx, "acquire")
	}
	var start time.Time
	if m.cfg.OnAcquire != nil {
		start = time.Now()
	}
	k := pairKey{user, project}
	if s := m.hit(k); s != nil {
		if m.cfg.OnAcquire != nil {
			m.observe(s, OutcomeMemoryHit, start)
		}
		l.s, l.outcome = s, OutcomeMemoryHit
		return nil
	}
	if err := ValidateIDs(user, project); err != nil {
		return err
	}
	sh := m.pool.shard(k)
	sh.slowAcquires.Add(1)
	s, o, err := m.acquireSlow(ctx, k, sh)
	if m.cfg.OnAcquire != nil {
		m.observe(s, o, start)
	}
	l.s, l.outcome = s, o
	return err
}

// observe calls OnAcquire for an Acquire that leased s (nil when it
// failed). If OnAcquire panics, or exits the goroutine (a test's FailNow),
// the lease is released on the way out: its caller never gets the Lease,
// and a lease nobody can release would keep the sandbox alive, extended
// past MaxAge by its keepalive, for as long as the process runs.
func (m *Manager) observe(s *slot, o Outcome, start time.Time) {
	returned := false
	defer func() {
		if !returned && s != nil {
			m.release(s)
		}
	}()
	m.cfg.OnAcquire(o, time.Since(start))
	returned = true
}

// hit leases k's slot if it can be handed out with no I/O. Only validated
// pairs ever enter the pool, so an invalid pair cannot hit and is validated
// (and refused) on the slow path, still before any I/O; the length check
// keeps oversized input from being hashed.
func (m *Manager) hit(k pairKey) *slot {
	if len(k.user) > MaxIDLen || len(k.project) > MaxIDLen {
		return nil
	}
	h := hashPair(m.pool.seed, k)
	sh := m.pool.shards[h&m.pool.mask]
	s := sh.lookup(h, k) // no lock: see index
	if s == nil {
		s = sh.get(k) // a concurrent resize may have hidden it: look again, exactly
	}
	if s == nil || m.clock.coarse() >= s.hitUntil.Load() || !m.tryHit(sh, s) {
		return nil
	}
	return s
}

// Use runs fn with the pair's sandbox leased for the duration of the call,
// and returns fn's error (or Acquire's): Acquire plus Release, with the
// Lease on Use's own stack whatever fn does. An fn that finds the sandbox
// failing it returns an error wrapping ErrSandboxNotFound or
// ErrSandboxUnresponsive: the sandbox is then rechecked before it is handed
// out again, as Lease.Recheck does.
func (m *Manager) Use(ctx context.Context, user, project string, fn func(Sandbox) error) error {
	var l Lease
	if err := m.acquire(ctx, &l, user, project); err != nil {
		return err
	}
	defer m.release(l.s)
	err := fn(l.s.sandbox())
	if err != nil && (errors.Is(err, ErrSandboxNotFound) || errors.Is(err, ErrSandboxUnresponsive)) {
		m.recheck(l.s)
	}
	return err
}

// endedErr is op's error for a caller whose ctx had already ended when it
// called. Acquire and Remove check for that first, as database/sql and
// pgxpool do: a caller already gone starts nothing. The ids are not quoted:
// they are not validated yet, and an ended context wins over invalid ones.
func endedErr(ctx context.Context, op string) error {
	return fmt.Errorf("sandboxpool: %s: %w", op, context.Cause(ctx))
}

// acquireSlow waits for (or starts) the pair's flight and leases its result.
func (m *Manager) acquireSlow(ctx context.Context, k pairKey, sh *shard) (*slot, Outcome, error) {
	for attempt := 0; ; attempt++ {
		f, started := m.pool.join(sh, k)
		if started && !m.goBackground(func() { m.runFill(ctx, sh, f.key, f) }) {
			m.pool.finish(sh, k, f, nil, OutcomeError, ErrClosed)
		}
		select {
		case <-f.done:
		case <-ctx.Done():
			m.pool.leave(sh, k, f)
			return nil, OutcomeError, pairErr("acquire", k, context.Cause(ctx))
		}
		m.pool.leave(sh, k, f)
		if f.err != nil {
			return nil, OutcomeError, f.err
		}
		if sh.get(k) == f.s && m.tryLease(f.s) {
			if m.clock.precise() < m.expiresAt(f.s) {
				return f.s, f.outcome, nil
			}
			m.unlease(f.s) // MaxAge passed during the fill's I/O: never handed out; the next fill rotates it
		}
		if attempt+1 >= maxLeaseAttempts {
			return nil, OutcomeError, pairErr("acquire", k, errors.New("sandbox was removed while being acquired"))
		}
	}
}

// runFill runs a fill with its own deadline, detached from every caller, and
// publishes the result to the flight's waiters. The fill carries the
// values of the ctx of the Acquire that started it (a trace span, a
// request id a log handler reads), so that its Redis and provider calls,
// and its log lines, belong to that request, as puddle hands its
// constructor the acquiring context's values; its cancellation and
// deadline are the Manager's and CreateTimeout, never that caller's.
func (m *Manager) runFill(values context.Context, sh *shard, k pairKey, f *flight) {
	ctx, cancel := m.detached(values, m.cfg.CreateTimeout)
	defer cancel()
	s, o, err := m.fill(ctx, sh, k)
	m.pool.finish(sh, k, f, s, o, m.closedErr(err))
}

// detached returns a context for work done for a caller but not bounded
// by it: it carries values's values, ends d from now, and is cancelled
// by Close (it derives from the Manager's context), never by values's
// cancellation.
func (m *Manager) detached(values context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(m.baseCtx, d)
	return valuesOf{ctx, values}, cancel
}

// valuesOf is a context with the deadline, cancellation and cause of its
// Context and the values of values, as puddle's valueCancelCtx. Value asks
// the Context first: it derives from the Manager's context, which holds no
// values, so it answers only the context package's own key for its
// cancellation, with which contexts derived from a valuesOf (one per
// Redis call) join the Context's cancellation directly; asked of values
// first, that key would find values's own, and each would wait on a
// goroutine of its own.
type valuesOf struct {
	context.Context
	values context.Context
}

func (c valuesOf) Value(key any) any {
	if v := c.Context.Value(key); v != nil {
		return v
	}
	return c.values.Value(key)
}

// closedErr is err of work that Close cut short (it gave up waiting and
// cancelled the Manager's context), wrapped with ErrClosed so that the
// caller learns that the Manager closed, with the cause kept; any other
// err as it is.
func (m *Manager) closedErr(err error) error {
	if err == nil || m.baseCtx.Err() == nil || errors.Is(err, ErrClosed) {
		return err
	}
	return fmt.Errorf("%w: %w", ErrClosed, err)
}

// fill makes sure the pair has a usable slot in the pool: it probes or
// extends a cached one, reconnects to one known to Redis, adopts one found by
// metadata, or creates one, and says which. It runs once per pair at a time.
func (m *Manager) fill(ctx context.Context, sh *shard, k pairKey) (*slot, Outcome, error) {
	if s := sh.get(k); s != nil {
		now := m.clock.precise()
		if s.state() == stateLive && now < m.expiresAt(s) {
			ok, err := m.revalidate(ctx, s, now)
			if err != nil {
				return nil, OutcomeError, err
			}
			switch {
			case ok:
				return s, OutcomeMemoryHit, nil
			case s.state() == stateLive: // definitively gone, or condemned: replace it below
				m.ctr.replaced.Add(1)
				m.pool.detach(sh, s, stateDead, false)
				m.forget(ctx, s)
			} // else superseded by the sandbox Redis names: found below
		} else {
			m.retire(sh, s, "max age reached")
		}
	}
	s, err := m.fromCache(ctx, sh, k)
	if s == nil && (err == nil || errors.Is(err, errRedisUnavailable)) {
		// A read Redis failed is no miss, but the create path reads again
		// under the pair's lock before it creates.
		s, err = m.create(ctx, sh, k)
	}
	switch {
	case err != nil:
		return nil, OutcomeError, err
	case s.hasFlag(flagCreated):
		return s, OutcomeCreated, nil
	}
	return s, OutcomeCacheHit, nil
}

// expiresAt is when s stops being handed out: createdAt + MaxAge.
func (m *Manager) expiresAt(s *slot) int64 { return s.createdAt + int64(m.cfg.MaxAge) }

// revalidate decides whether a cached slot can be handed out: it extends a
// deadline about to pass (which also proves the sandbox is alive, and asks
// Redis whether it is still the pair's sandbox), or probes it. A suspect
// (see suspects) is probed whatever else ran, since the provider's API
// answers for a sandbox that does not, unless it was probed within
// suspectProbeEvery: then it fails with that probe's error, with no I/O.
// ok is false with a nil error on a definitive not-found, when s was
// condemned (killed), or when the extension found s superseded (s is then
// retired).
func (m *Manager) revalidate(ctx context.Context, s *slot, now int64) (ok bool, err error) {
	if err := m.recentVerdict(s, now); err != nil {
		return false, pairErr("check sandbox "+s.id, s.key, err)
	}
	suspect := s.hasFlag(flagSuspect)
	probe := suspect || m.probeAfter < 0 || now-s.lastCheck.Load() >= m.probeAfter
	if now >= s.deadline.Load()-m.touchLead() {
		err, probe = m.touch(ctx, s, now), suspect
	}
	if err == nil && probe && s.state() == stateLive {
		m.ctr.healthChecks.Add(1)
		if err = m.check(ctx, s); err == nil {
			m.probeAnswered(now)
			m.acquit(s)
		}
	}
	switch {
	case err == nil:
		s.lastCheck.Store(now)
		m.refreshHit(s)
		return s.state() == stateLive, nil
	case errors.Is(err, ErrSandboxNotFound):
		return false, nil
	case errors.Is(err, ErrSandboxUnresponsive):
		var killed bool
		if killed, err = m.condemn(ctx, s, now, err); killed {
			return false, nil
		}
	}
	// Ambiguous, or unresponsive and not condemned yet: fail closed, keep
	// the sandbox, report the error.
	return false, pairErr("check sandbox "+s.id, s.key, err)
}

// check probes s (Provider.Check) within checkTimeout. A probe it cut
// short is told from one its caller's ctx ended.
func (m *Manager) check(ctx context.Context, s *slot) error {
	cctx, cancel := context.WithTimeout(ctx, m.cfg.checkTimeout)
	defer cancel()
	err := m.provider.Check(cctx, s.sandbox())
	if err != nil && cctx.Err() != nil && ctx.Err() == nil {
		err = fmt.Errorf("no answer to its probe within %s: %w", m.cfg.checkTimeout, err)
	}
	return err
}

// create admits, finds or creates the pair's sandbox and parks it. With
// Redis it coordinates across instances. Once the breaker has judged Redis
// unavailable it creates without the lock (counted), or refuses if so
// configured. A Redis call that fails with the breaker still closed is no
// such judgement (a call RedisTimeout cut short while Redis answered others,
// in a burst on a busy host): creating then could make the pair a second
// sandbox, so the coordinated create is tried again, every redisRetry,
// until it succeeds, the breaker opens, Redis has refused writes for
// RedisTimeout (see refusesWrites), a Cluster has judged a master holding
// a key the create needs lost, failed with no replica to take its place
// (see keysLost), or the fill's time runs out (see coordination for what
// the attempts share).
func (m *Manager) create(ctx context.Context, sh *shard, k pairKey) (*slot, error) {
	m.ctr.cacheMisses.Add(1)
	if m.store != nil {
		co := &coordination{token: rand.Text()}
	coordinated:
		for !m.store.degraded() {
			s, err := m.createCoordinated(ctx, sh, k, co)
			switch {
			case !errors.Is(err, errRedisUnavailable):
				return s, err
			case m.store.degraded():
				m.log.LogAttrs(ctx, slog.LevelWarn, "sandboxpool: Redis unavailable on the create path", slog.Any("error", err))
			case refusesWrites(err) && m.refusedTooLong(ctx, err):
				break coordinated
			case !isRedisError(err) && m.keysLost(ctx, k): // unanswered, on a lost master
				break coordinated
			case !pause(ctx, redisRetry):
				return nil, pairErr("create", k, fmt.Errorf("%w: %w", ErrUnavailable, err))
			}
		}
		if m.cfg.RefuseCreatesWhenDegraded {
			return nil, pairErr("create", k, ErrUnavailable)
		}
	}
	s, err := m.createLocal(ctx, k, true)
	if err != nil {
		return nil, err
	}
	if m.store != nil {
		m.ctr.degradedCreates.Add(1)
		m.markUnpublished(s)
	}
	m.park(sh, s)
	return s, nil
}

// refusedTooLong reports whether Redis, which refused a write with err,
// has refused writes long enough for creates to go without the lock (see
// store.writesRefused), and logs the first such create of the episode.
func (m *Manager) refusedTooLong(ctx context.Context, err error) bool {
	long, first := m.store.writesRefused()
	if first {
		m.log.LogAttrs(ctx, slog.LevelWarn, "sandboxpool: Redis refuses writes: creating without the lock until it takes them again", slog.Any("error", err))
	}
	return long
}

// createLocal reserves in-process quota (and rate, if withRate), then adopts
// or creates. The caller parks the result.
func (m *Manager) createLocal(ctx context.Context, k pairKey, withRate bool) (*slot, error) {
	if err := m.admit.reserve(k, m.clock.precise(), withRate); err != nil {
		m.countRefusal(err)
		return nil, pairErr("create", k, err)
	}
	s, err := m.adoptOrCreate(ctx, k)
	if err != nil {
		m.admit.release(k)
		return nil, err
	}
	s.setFlag(flagCounted)
	return s, nil
}

// createCoordinated is the cold path across instances: cluster-wide
// admission, then a create under the pair's Redis lock (createUnderLock).
// A create whose lock was lost with nothing published in its place is tried
// again, once: the second attempt waits for whoever holds the lock now and
// adopts what it publishes.
func (m *Manager) createCoordinated(ctx context.Context, sh *shard, k pairKey, co *coordination) (*slot, error) {
	if err := m.reserveRemote(ctx, k, co); err != nil {
		m.countRefusal(err)
		if errors.Is(err, errRedisUnavailable) {
			return nil, err
		}
		return nil, pairErr("create", k, err)
	}
	for attempt := 1; ; attempt++ {
		s, err := m.createUnderLock(ctx, sh, k, co)
		if !errors.Is(err, errLockLost) {
			return s, err
		}
		if attempt == lostLockAttempts {
			return nil, pairErr("create", k, fmt.Errorf("%w: %w (%d times)", ErrUnavailable, err, attempt))
		}
	}
}

// coordination is what the attempts of one coordinated create share (see
// create): the lock token, so that a lock whose grant reached Redis but
// whose reply was lost is this create's own to take again, not a
// stranger's to wait out for LockTTL; and whether CreateLimit has let the
// create through, so that a create tried again is charged once.
type coordination struct {
	token string
	rated bool
	// placeUntil is the create's provisional quota place's expiry (unix
	// ns): CreateTimeout from its cluster-wide admission.
	placeUntil int64
}

// lostLockAttempts bounds the creates of one fill that may lose their lock
// with nothing published: a lock lost once is a create that outlived a
// refresh (a stall, a failover); lost again at once, locks are vanishing,
// and the caller is better told so than kept waiting.
const lostLockAttempts = 2

// errLockLost is a create whose lock expired before it could publish, with
// no other sandbox published for the pair.
var errLockLost = errors.New("the create lock was lost and no sandbox was published")

// createUnderLock takes the pair's Redis lock, reads Redis again (another
// instance may have just published), adopts or creates, and publishes only
// while the lock holds. A creator that lost its lock keeps its sandbox if
// it is the pair's, and otherwise adopts the winner's (see
// settleLostLock). The pair's quota place is kept on success and dropped
// when the create fails under the lock.
func (m *Manager) createUnderLock(ctx context.Context, sh *shard, k pairKey, co *coordination) (*slot, error) {
	lock, err := m.obtainLock(ctx, k, co.token)
	if err != nil {
		// The pair's quota place stays: whoever holds the lock may be
		// creating under it, and an attempt tried again reserves the same
		// place. A place this create's reservation added expires, left
		// alone, at its CreateTimeout.
		if errors.Is(err, errRedisUnavailable) {
			return nil, err
		}
		return nil, pairErr("create", k, err)
	}
	defer m.releaseLock(ctx, lock)
	if s, err := m.fromCache(ctx, sh, k); s != nil || err != nil {
		return s, err // published by another instance while we waited
	}
	m.refreshReservation(ctx, k, co.placeUntil) // the pair's pending create is this one now
	s, err := m.createLocal(ctx, k, false)
	if err != nil {
		// The place goes even when ctx has ended (Close cut the create
		// short), or it would count against the quotas until CreateTimeout.
		uctx, cancel := m.outlive(ctx)
		_ = m.store.unreserve(uctx, k)
		cancel()
		return nil, err
	}
	ok, err := m.store.publish(ctx, s, lock.lock.Token())
	switch {
	case err != nil: // Redis failed after the create: keep it, publish on recovery
		m.markUnpublished(s)
	case !ok: // our lock expired: another instance may have published meanwhile
		m.ctr.lockLost.Add(1)
		if w, err := m.settleLostLock(ctx, sh, s, co.token); w != s {
			return w, err
		}
	}
	m.park(sh, s)
	m.settleReservation(ctx, k, s.deadline.Load()) // from the provisional expiry to the sandbox's deadline
	return s, nil
}

// settleLostLock decides the fate of s, made or adopted by a create whose
// lock expired before it could publish. It returns s when s is the pair's
// (its new holder found it by metadata and published it, or nobody took
// the lock and s is now published). Otherwise it kills s if this create
// made it (never a sandbox it adopted: others may use it) and returns the
// sandbox Redis names, or errLockLost when there is none. When Redis fails
// the read, whether s is the pair's is unknown: s is neither killed (a new
// holder may have published it) nor handed out, and the error is
// returned; the create's next attempt finds s by metadata or in Redis, or
// its provider deadline ends it.
func (m *Manager) settleLostLock(ctx context.Context, sh *shard, s *slot, token string) (*slot, error) {
	rec, found, err := m.store.get(ctx, s.key)
	switch {
	case err != nil && !answered(err):
		m.dropReservation(s)
		return nil, pairErr("read Redis record", s.key, err)
	case err == nil && (found && rec.id == s.id || !found && m.publishIfLockFree(ctx, s, token)):
		return s, nil
	}
	m.dropReservation(s)
	if s.hasFlag(flagCreated) && s.setFlag(flagKilled) {
		m.log.LogAttrs(ctx, slog.LevelWarn, "sandboxpool: create lock lost before publish; killing our sandbox", slog.String("sandbox", s.id))
		_ = m.killID(ctx, s.id, "lost the create lock")
	}
	if w, err := m.fromCache(ctx, sh, s.key); w != nil || err != nil {
		return w, err
	}
	return nil, errLockLost
}

// dropReservation releases the in-process quota place s holds, once.
func (m *Manager) dropReservation(s *slot) {
	if s.clearFlag(flagCounted) {
		m.admit.release(s.key)
	}
}

func (m *Manager) countRefusal(err error) {
	switch {
	case errors.Is(err, ErrRateLimited):
		m.ctr.rateLimited.Add(1)
	case errors.Is(err, ErrQuotaExceeded):
		m.ctr.quotaRejected.Add(1)
	}
}

// pairMetadata is the provider metadata that marks a pair's sandbox.
func (m *Manager) pairMetadata(k pairKey) map[string]string {
	return map[string]string{MetaNamespace: m.cfg.Namespace, MetaUser: k.user, MetaProject: k.project}
}

// adoptOrCreate looks for the pair's sandbox by metadata (left by an earlier
// process, or by a create whose outcome was unknown) and adopts the newest
// usable one; only when there is none does it create. A failed lookup is
// returned: creating blind could duplicate.
func (m *Manager) adoptOrCreate(ctx context.Context, k pairKey) (*slot, error) {
	found, err := m.listPair(ctx, k)
	if err != nil {
		return nil, pairErr("list sandboxes", k, err)
	}
	if s, err := m.adoptFound(ctx, k, found); s != nil || err != nil {
		return s, err
	}
	s, err := m.createNew(ctx, k)
	if err != nil && outcomeUnknown(err) {
		// The create may have happened: reconcile by metadata before
		// anything creates again, and adopt what it made.
		if again, lerr := m.listPair(ctx, k); lerr == nil && len(again) > 0 {
			m.ctr.reconciled.Add(1)
			if s, aerr := m.adoptFound(ctx, k, again); s != nil {
				return s, aerr
			}
		}
	}
	return s, err
}

// listPair lists the pair's sandboxes by metadata, leaving out any the
// provider reports without an ID (there is nothing to connect to or kill),
// and any whose reported metadata names another pair or namespace: what it
// lists is adopted, handed to the pair's user, and killed by Remove, so a
// provider that did not apply the filter (an API change, a proxy that
// dropped the query) must not give one user another's sandbox, or make a
// Remove kill every sandbox of the team.
func (m *Manager) listPair(ctx context.Context, k pairKey) ([]Sandbox, error) {
	want := m.pairMetadata(k)
	found, err := m.provider.List(ctx, want)
	foreign := 0
	found = slices.DeleteFunc(found, func(sb Sandbox) bool {
		switch {
		case sb.ID == "":
			return true
		case sb.Metadata != nil && !e2b.MetadataMatches(sb.Metadata, want): // unreported: the provider's filter is trusted
			foreign++
			return true
		}
		return false
	})
	if foreign > 0 {
		m.log.LogAttrs(ctx, slogWarn, "sandboxpool: the provider listed sandboxes that do not match the pair's metadata; ignored",
			slog.String("pair", pairMember(k)), slog.Int("ignored", foreign))
	}
	return found, err
}

// adoptFound connects to the newest of the pair's sandboxes that is younger
// than MaxAge (and, without Redis, kills the older ones). It returns nil,
// nil when none can be adopted.
func (m *Manager) adoptFound(ctx context.Context, k pairKey, found []Sandbox) (*slot, error) {
	sort.Slice(found, func(i, j int) bool { return found[i].CreatedAt.After(found[j].CreatedAt) })
	now := m.clock.precise()
	for i, sb := range found {
		created := min(sb.CreatedAt.UnixNano(), now) // a provider clock ahead does not stretch MaxAge
		if created <= m.staleAt(now) {
			// Past MaxAge: never handed out again. It may still be leased
			// (here or elsewhere), so it is left to its holder and to its
			// provider deadline, which is aligned with MaxAge.
			continue
		}
		s, err := m.connect(ctx, k, sb.ID, created, now)
		if err == nil {
			m.ctr.adopted.Add(1)
			if m.store == nil { // alone: older duplicates are an earlier process's leftovers
				for _, dup := range found[i+1:] {
					if dup.CreatedAt.UnixNano() > m.staleAt(now) {
						_ = m.killID(ctx, dup.ID, "duplicate sandbox of the pair") // counted and logged
					}
				}
			}
			// With Redis, another instance may still lease a duplicate: once
			// this one is published, its holders find it superseded at their
			// next keepalive and stop extending it (cacheTouch).
			return s, nil
		}
		if !errors.Is(err, ErrSandboxNotFound) {
			return nil, err
		}
	}
	return nil, nil
}

// createNew calls Provider.Create with the aligned deadline and metadata.
func (m *Manager) createNew(ctx context.Context, k pairKey) (*slot, error) {
	meta := m.pairMetadata(k)
	for key, v := range m.cfg.Metadata {
		meta[key] = v
	}
	sb, err := m.provider.Create(ctx, CreateRequest{Template: m.cfg.Template, Timeout: m.cfg.IdleTimeout, Metadata: meta})
	if err == nil && sb.ID == "" {
		err = errNoSandboxID
	}
	if err != nil {
		m.ctr.createErrors.Add(1)
		return nil, pairErr("create sandbox", k, err)
	}
	m.ctr.creates.Add(1)
	// Timed from this clock, not the provider's (E2B's create does not even
	// answer with one): a provider clock behind by MaxAge would make the
	// sandbox past MaxAge at birth, one ahead would keep it past MaxAge.
	now := m.clock.precise()
	sb.CreatedAt = time.Unix(0, now)
	s := m.newSlot(k, sb, now, now, now+int64(m.cfg.IdleTimeout))
	s.setFlag(flagCreated)
	return s, nil
}

// connect reattaches to an existing sandbox with the pair's aligned deadline.
func (m *Manager) connect(ctx context.Context, k pairKey, id string, createdAt, now int64) (*slot, error) {
	deadline := min(now+int64(m.cfg.IdleTimeout), createdAt+int64(m.cfg.MaxAge))
	sb, err := m.provider.Connect(ctx, id, time.Duration(deadline-now))
	switch {
	case err != nil:
	case sb.ID == "":
		sb.ID = id
	case sb.ID != id: // not a not-found: the sandbox asked for is kept (fail closed)
		err = fmt.Errorf("provider answered with another sandbox, %s", sb.ID)
	}
	if err != nil {
		return nil, pairErr("connect sandbox "+id, k, err)
	}
	m.ctr.reconnects.Add(1)
	return m.newSlot(k, sb, createdAt, now, deadline), nil
}

// newSlot builds an unpublished slot for sb, just created or connected (so
// checked) at now, with the given provider deadline.
func (m *Manager) newSlot(k pairKey, sb Sandbox, createdAt, now, deadline int64) *slot {
	if sb.Template == "" {
		sb.Template = m.cfg.Template
	}
	s := allocSlot(k)
	s.createdAt, s.id, s.token, s.heapIdx = createdAt, sb.ID, sb.AccessToken, -1
	s.shape = m.intern(shape{m: m, template: sb.Template, domain: sb.Domain, envdVersion: sb.EnvdVersion, envdURL: sb.envdURL})
	s.lastUse.Store(now)
	s.lastCheck.Store(now)
	s.deadline.Store(deadline)
	m.refreshHit(s)
	return s
}

// maxShapes bounds the intern table: far more than the template × domain ×
// envd version combinations a deployment sees; past it, shapes are not shared.
const maxShapes = 256

// intern returns the shared copy of sh.
func (m *Manager) intern(sh shape) *shape {
	m.shapesMu.Lock()
	defer m.shapesMu.Unlock()
	if p := m.shapes[sh]; p != nil {
		return p
	}
	p := &sh
	if len(m.shapes) < maxShapes {
		m.shapes[sh] = p
	}
	return p
}

// refreshHit recomputes s.hitUntil, the instant from which a memory hit must
// take the slow path: MaxAge reached, the provider deadline within touchLead
// (the reaper's last visit before that deadline may already have found s
// unleased, so the fill pushes it for the lease about to start), or the last
// check older than HealthCheckAfter. Writers call it after changing deadline
// or lastCheck. It re-reads its inputs after storing and tries again if they
// moved, so a writer racing with another never leaves a value computed from
// inputs older than the latest.
func (m *Manager) refreshHit(s *slot) {
	for {
		dl, lc := s.deadline.Load(), s.lastCheck.Load()
		until := int64(math.MinInt64) // HealthCheckAfter -1: always probe
		if m.probeAfter >= 0 {
			until = min(m.expiresAt(s), dl-m.touchLead(), lc+m.probeAfter)
		}
		s.hitUntil.Store(until)
		if s.deadline.Load() == dl && s.lastCheck.Load() == lc {
			return
		}
	}
}

// park puts s in the pool and hands it to the reaper.
func (m *Manager) park(sh *shard, s *slot) {
	if old := m.pool.put(sh, s); old != nil && old.leases() == 0 {
		m.endLater(old, "replaced")
	}
	m.reaper.schedule(s, m.nextVisit(s, m.clock.precise()))
}

// Remove destroys the pair's sandbox and forgets it everywhere, even if it is
// leased (later Releases are harmless). It waits for an Acquire of the pair
// that is in flight. With Redis, it holds the pair's create lock while it
// works, so a create of the pair in flight on another instance finishes
// first and is removed too, and announces the sandboxes it killed to the
// other instances, which forget them at once. If Redis does not answer, it
// still kills what it finds, and returns an error wrapping ErrUnavailable:
// the deletion of the pair's record and the announcement are made once
// Redis answers this instance again, or by Close if Redis answers then.
// Removing a pair that has no sandbox is not an error. With a ctx that has
// already ended, Remove returns its error and changes nothing.
//
// Close waits for a Remove in flight, so that what Redis did not answer is
// in Close's last try, and cuts it if Close's own ctx ends first: the
// Remove then returns an error wrapping ErrClosed.
func (m *Manager) Remove(ctx context.Context, user, project string) error {
	if !m.enter() {
		return ErrClosed
	}
	defer m.bg.Done()
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	defer context.AfterFunc(m.baseCtx, func() { cancel(ErrClosed) })()
	return m.closedErr(m.remove(ctx, user, project))
}

// enter counts a caller's call in the work Close waits for, unless Close
// has begun; the caller must then call m.bg.Done.
func (m *Manager) enter() bool {
	m.bgMu.Lock()
	defer m.bgMu.Unlock()
	if m.closed.Load() {
		return false
	}
	m.bg.Add(1)
	return true
}

// remove is Remove's work, within Close's wait.
func (m *Manager) remove(ctx context.Context, user, project string) error {
	if ctx.Err() != nil { // half a removal would leave the pair named in Redis
		return endedErr(ctx, "remove")
	}
	if err := ValidateIDs(user, project); err != nil {
		return err
	}
	k := pairKey{user, project}
	sh := m.pool.shard(k)
	if f := m.inFlight(sh, k); f != nil {
		select {
		case <-f.done:
			m.pool.leave(sh, k, f)
		case <-ctx.Done():
			m.pool.leave(sh, k, f)
			return pairErr("remove", k, context.Cause(ctx))
		}
	}
	if lock, err := m.lockForRemoval(ctx, k); err != nil {
		return err
	} else if lock != nil {
		defer m.releaseLock(ctx, lock)
	}
	var errs []error
	var removed []string // the pair's sandboxes killed (or found already gone)
	var pooled string    // the pooled sandbox, while its kill has failed
	var poolErr error
	if s := sh.get(k); s != nil && m.pool.detach(sh, s, stateDead, false) {
		m.reaper.unschedule(s)
		if err := m.kill(ctx, s); err != nil {
			pooled, poolErr = s.id, err
		} else {
			removed = append(removed, s.id)
		}
		m.forget(ctx, s)
	}
	// Sandboxes of the pair this process does not hold (another instance's,
	// or an earlier process's) are found by metadata: the pooled one too,
	// if its kill failed, which is then tried again.
	found, err := m.listPair(ctx, k)
	if err != nil {
		errs = append(errs, pairErr("list sandboxes", k, err))
	}
	for _, sb := range found {
		if slices.Contains(removed, sb.ID) {
			continue
		}
		err := m.killID(ctx, sb.ID, "removed")
		switch {
		case sb.ID == pooled:
			poolErr = err // the second try's answer is the one to report
		case err != nil:
			errs = append(errs, err)
		}
		if err == nil {
			removed = append(removed, sb.ID)
		}
	}
	if poolErr != nil {
		errs = append(errs, poolErr)
	}
	// An Acquire that ran meanwhile may have pooled one of them here; other
	// instances may hold them in memory, where a hit would hand them out
	// until a probe: tell everyone.
	m.dropRemoved(k, removed)
	uerr := m.uncache(ctx, k)
	if uerr != nil {
		errs = append(errs, uerr)
	}
	if err := m.announceRemoval(ctx, k, removed); err != nil {
		// The sandboxes are killed. Unless Redis refused, the announcement
		// (and the record's deletion) is made once Redis answers again;
		// instances not told find the sandboxes gone at their next probe.
		m.log.LogAttrs(ctx, m.redisFailureLevel(err), "sandboxpool: announcing a removal to other instances failed", slog.String("pair", pairMember(k)), attrErr(err))
	} else if uerr != nil && !answered(uerr) && len(removed) > 0 {
		m.keepRemoval(removal{k, removed}) // the record is deleted once Redis answers again
	}
	return errors.Join(errs...)
}

// lockForRemoval takes the pair's create lock for a Remove, so that a
// create of the pair in flight on any instance finishes (and publishes)
// before the Remove looks, and is removed with the rest, and no create
// starts until the Remove is done. It returns no lock, and no error,
// without Redis or when Redis fails: a Remove does not wait for Redis to
// recover, it kills what it finds. It returns the caller's error when ctx
// ends first, with nothing changed.
func (m *Manager) lockForRemoval(ctx context.Context, k pairKey) (*pairLock, error) {
	if m.store == nil || m.store.degraded() {
		return nil, nil
	}
	lock, err := m.obtainLock(ctx, k, rand.Text())
	switch {
	case err == nil:
		return lock, nil
	case ctx.Err() != nil:
		return nil, pairErr("remove", k, context.Cause(ctx))
	}
	m.log.LogAttrs(ctx, m.redisFailureLevel(err), "sandboxpool: removing without the pair's create lock", slog.String("pair", pairMember(k)), attrErr(err))
	return nil, nil
}

// dropRemoved forgets the pair's slot if it holds one of the sandboxes ids,
// which a Remove (here or on another instance) killed. It does no I/O: the
// remover killed them and deleted the record. Leases held on the slot end
// harmlessly, as after a Remove here.
func (m *Manager) dropRemoved(k pairKey, ids []string) {
	sh := m.pool.shard(k)
	s := sh.get(k)
	if s == nil || !slices.Contains(ids, s.id) || !m.pool.detach(sh, s, stateDead, false) {
		return
	}
	s.setFlag(flagKilled)
	m.forgetLocal(s)
}

// inFlight returns the pair's running flight with a reference held, or nil.
func (m *Manager) inFlight(sh *shard, k pairKey) *flight {
	sh.mu.Lock()
	defer sh.mu.Unlock()
	f := sh.flights[k]
	if f == nil || f.finished {
		return nil
	}
	f.refs++
	return f
}

// kill destroys s's sandbox once.
func (m *Manager) kill(ctx context.Context, s *slot) error {
	if !s.setFlag(flagKilled) {
		return nil
	}
	return m.killID(ctx, s.id, "")
}

func (m *Manager) killID(ctx context.Context, id, why string) error {
	if err := m.provider.Kill(ctx, id); err != nil {
		m.ctr.killErrors.Add(1)
		m.log.LogAttrs(ctx, m.providerFailing.failed(true), "sandboxpool: kill failed", slog.String("sandbox", id), slog.String("reason", why), slog.Any("error", err))
		return fmt.Errorf("sandboxpool: kill sandbox %s: %w", id, err)
	}
	m.ctr.kills.Add(1)
	m.providerFailing.succeeded(ctx, m.log)
	return nil
}

// retire takes s out of the pool for good (past MaxAge, or superseded) and
// reports whether this call did. It is ended now if no lease holds it, else
// at its last release (see unlease).
func (m *Manager) retire(sh *shard, s *slot, why string) bool {
	if !m.pool.detach(sh, s, stateRetired, false) {
		return false
	}
	if s.leases() == 0 {
		m.endLater(s, why)
	}
	return true
}

// endLater runs endRetired in the background, for callers that must not
// block on I/O (Release, a fill replacing a slot).
func (m *Manager) endLater(s *slot, why string) {
	if s.hasFlag(flagKilled) {
		return
	}
	m.goBackground(func() {
		ctx, cancel := context.WithTimeout(m.baseCtx, killTimeout)
		defer cancel()
		m.endRetired(ctx, s, why)
	})
}

// endRetired disposes of a slot that left the pool once its last lease in
// this process has ended: it kills the sandbox and forgets the slot. Two
// exceptions, both with Redis, where the sandbox may still be leased on
// another instance whose keepalive holds its provider deadline, so it is
// not ours to kill: a sandbox retired for age, and one superseded by the
// sandbox Redis names. Nothing pushes such a deadline but a holder's
// keepalive, IdleTimeout/2 at a time, and a holder stops once it knows, so
// the provider reaps it within IdleTimeout/2 of its last lease anywhere.
// Alone in memory-only mode, or retired as a replaced sandbox, it is killed
// now.
func (m *Manager) endRetired(ctx context.Context, s *slot, why string) {
	if m.store != nil && (s.hasFlag(flagSuperseded) || m.clock.precise() >= m.expiresAt(s)) {
		if s.setFlag(flagKilled) {
			m.log.LogAttrs(ctx, slog.LevelDebug, "sandboxpool: retired; left to its provider deadline", slog.String("sandbox", s.id), slog.String("reason", why))
		}
		m.forget(ctx, s)
		return
	}
	m.killAndForget(ctx, s, why)
}

// supersede retires s because Redis names another sandbox for its pair (a
// duplicate made during a Redis outage, or by creators whose locks
// expired): this instance stops handing s out and, once its own leases end,
// stops extending it, and converges on the sandbox Redis names. s is not
// killed (see endRetired): other instances may hold leases on it.
func (m *Manager) supersede(ctx context.Context, s *slot) {
	s.setFlag(flagSuperseded)
	if m.retire(m.pool.shard(s.key), s, "superseded") {
		m.ctr.superseded.Add(1)
		m.log.LogAttrs(ctx, slog.LevelDebug, "sandboxpool: Redis names another sandbox for the pair; this one is retired", slog.String("sandbox", s.id))
	}
}

// killAndForget kills s (once) and drops what the Manager holds for it. The
// reaper calls it directly from its bounded workers: spawning a goroutine
// per expiry would make a mass expiry cost a goroutine per sandbox.
func (m *Manager) killAndForget(ctx context.Context, s *slot, why string) {
	if s.setFlag(flagKilled) {
		m.log.LogAttrs(ctx, slog.LevelDebug, "sandboxpool: killing sandbox", slog.String("sandbox", s.id), slog.String("reason", why))
		_ = m.killID(ctx, s.id, why) // counted and logged; the provider deadline reaps it anyway
	}
	m.forget(ctx, s)
}

// forget drops what the Manager holds for a slot that left the pool: its
// quota reservation and its Redis entry (compare-and-delete, so a newer
// sandbox's entry survives).
func (m *Manager) forget(ctx context.Context, s *slot) {
	m.forgetLocal(s)
	m.uncacheSlot(ctx, s)
}

// forgetLocal drops what this process holds for s: its reaper entry, its
// quota reservation, its place among suspects and among unpublished slots.
func (m *Manager) forgetLocal(s *slot) {
	m.reaper.unschedule(s)
	m.dropReservation(s)
	m.acquit(s)
	m.unpubMu.Lock()
	delete(m.unpublished, s)
	m.unpubMu.Unlock()
}

// Close stops the Manager: later Acquire and Remove calls return ErrClosed,
// background work stops, and Close waits for it, including fills and
// Removes in flight, until ctx ends (then they are cancelled, their waiting
// Acquires and the Removes return ErrClosed, and Close still waits for them
// to return: a create cut short lets go of its pair's create lock and
// quota place, within RedisTimeout for a turn and RedisTimeout for each
// call). Sandboxes are left running: their provider deadlines reap them,
// or a new Manager reuses them.
//
// Once background work has stopped, Close makes one last try, within ctx
// and at most settleTimeout, at what waits for Redis to answer: it
// publishes the sandboxes created while Redis was down, so that another
// instance reuses them instead of creating new ones, and makes the
// removals Redis did not answer (Stats.UnannouncedRemovals): it deletes
// their records and announces them, so that the other instances forget
// those sandboxes at once. What Redis still does not answer is logged.
//
// Close may be called more than once, from any goroutine (a signal handler
// and a deferred Close, say): every call returns only once background work
// has stopped, as the first does, and returns nil unless its own ctx ended
// first and cut that work short.
//
// Last, Close closes the provider's idle HTTP connections, if it has a
// CloseIdleConnections method (NewE2BProvider's does), so that no
// connection of net/http's outlives the Manager with its goroutines (for 90
// s otherwise). That is all it closes: a provider shared with another
// Manager dials again at its next call. Config.Redis stays open, even when
// ConfigFromEnv built it: a Config may serve several Managers, so close it
// yourself after the last one.
func (m *Manager) Close(ctx context.Context) error {
	m.bgMu.Lock()
	first := !m.closed.Load()
	m.closed.Store(true)
	m.bgMu.Unlock()
	if first {
		close(m.done)
		go func() { m.bg.Wait(); close(m.stopped) }()
	}
	var err error
	select {
	case <-m.stopped:
	case <-ctx.Done():
		err = fmt.Errorf("sandboxpool: close: background work cancelled: %w", context.Cause(ctx))
		m.cancel()
		<-m.stopped
	}
	if err == nil {
		m.settleAtClose(ctx)
	}
	m.cancel()
	if p, ok := m.provider.(interface{ CloseIdleConnections() }); ok {
		p.CloseIdleConnections()
	}
	return err
}
