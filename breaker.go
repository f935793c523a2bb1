package sandboxpool

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"strings"
	"sync/atomic"
	"time"

	"github.com/bsm/redislock"
	"github.com/go-redis/redis_rate/v10"
	"github.com/redis/go-redis/v9"
	"github.com/sony/gobreaker/v2"
	"golang.org/x/sync/semaphore"
)

const (
	// breakerTrips consecutive Redis failures, with no answer from Redis
	// for RedisTimeout, open the breaker: one failure may be a blip, three
	// in a row while Redis says nothing is an outage worth not waiting on
	// (see store.silent).
	breakerTrips = 3
	// breakerCooldown is how long the breaker stays open before letting one
	// probe through.
	breakerCooldown = 5 * time.Second
	// redisProbeInterval is how often a degraded Manager pings Redis even
	// with no traffic; with breakerCooldown it bounds recovery to ~10 s,
	// inside the 15 s DESIGN promises.
	redisProbeInterval = 5 * time.Second
)

// errRedisUnavailable marks a failure of Redis itself (as opposed to a
// refusal such as a quota), after which the create path may degrade.
var errRedisUnavailable = errors.New("redis unavailable")

// answered reports an error that says Redis itself is well: a missing key,
// a record that does not parse, a key of another type (WRONGTYPE), or a
// command the client's ACL does not allow (NOPERM). The breaker does not
// count them, and they do not degrade the create path: a few bad keys, or a
// user barred from one command, must not switch every pair to
// uncoordinated creates.
func answered(err error) bool {
	if errors.Is(err, redis.Nil) || errors.Is(err, errCorruptRecord) {
		return true
	}
	var re redis.Error
	if !errors.As(err, &re) {
		return false
	}
	msg := re.Error()
	return strings.HasPrefix(msg, "WRONGTYPE") || strings.HasPrefix(msg, "NOPERM")
}

// refusesWrites reports an error reply with which Redis turns writes away
// while it may go on answering reads: out of memory under the noeviction
// policy (OOM), unable to persist (MISCONF), a replica (READONLY), or
// short of the replicas min-replicas-to-write asks for (NOREPLICAS). Such
// a Redis cannot coordinate creates, but it is no outage: the breaker
// stays closed (see heardFrom). So a create whose coordinated attempts
// meet it goes without the lock once writes have been refused for
// RedisTimeout (see store.writesRefused).
func refusesWrites(err error) bool {
	var re redis.Error
	if !errors.As(err, &re) {
		return false
	}
	msg := re.Error()
	for _, prefix := range []string{"OOM ", "MISCONF ", "READONLY ", "NOREPLICAS "} {
		if strings.HasPrefix(msg, prefix) {
			return true
		}
	}
	return false
}

// writesRefused notes a refusal to write and reports whether writes have
// been refused for RedisTimeout, with none taken since (see
// writesAccepted): as long as a silent Redis gets before the breaker opens.
// A refusal that lasts less (a Redis at its memory limit, freeing some as
// keys expire) is waited out, as a failure among answers is, so that a
// create goes without the lock only when the refusal looks like it will
// last; the creates that follow then go at once. first reports the call
// that should log the episode.
func (st *store) writesRefused() (long, first bool) {
	now := st.sinceBorn()
	if now-st.refusalSince(now) < int64(st.timeout) {
		return false, false
	}
	return true, st.refusalLogged.CompareAndSwap(false, true)
}

// writesAccepted ends an episode of refused writes: a record was written.
func (st *store) writesAccepted() {
	if st.refusedAt.Load() != 0 {
		st.refusedAt.Store(0)
		st.refusalLogged.Store(false)
		st.refused.succeeded(context.Background(), st.log)
	}
}

// refusalSince returns when the current episode of refused writes began,
// beginning it at now if none is under way.
func (st *store) refusalSince(now int64) int64 {
	if st.refusedAt.CompareAndSwap(0, now) {
		return now
	}
	if since := st.refusedAt.Load(); since != 0 {
		return since
	}
	return now // a write taken ended the episode meanwhile: this refusal is its own
}

// sinceBorn is the time since the store was made, on the monotonic clock,
// plus one: never 0, which refusedAt keeps for "taking writes".
func (st *store) sinceBorn() int64 { return int64(time.Since(st.born)) + 1 }

// heardFrom reports a call Redis answered: it succeeded, or failed with an
// answer (see answered), or with a refusal to write (see refusesWrites).
// The breaker counts it a success, and the silence clock (see
// store.silent) a sign of life. A Redis that refuses writes so keeps the
// breaker closed whether or not reads come its way, and the reads it
// answers still find other instances' sandboxes; the creates it holds up
// go without the lock after RedisTimeout (see writesRefused).
func heardFrom(err error) bool { return err == nil || answered(err) || refusesWrites(err) }

// errNoTurn is a Redis call that never started: its context ended while it
// waited for one of the Manager's Redis turns (see store.turns).
// errEndedByCaller is a call its caller's context ended before RedisTimeout
// did (a Remove under a handler's short deadline). Neither says anything
// about Redis, so the breaker does not count them (see endedHere).
var (
	errNoTurn        = errors.New("waiting for a Redis connection")
	errEndedByCaller = errors.New("the caller's context ended the Redis call")
)

// endedHere reports a call that failed for a reason on this side: its
// caller gave up, or it never got its turn.
func endedHere(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, errNoTurn) || errors.Is(err, errEndedByCaller)
}

// store is the Manager's Redis: client, breaker, lock and rate limiter.
type store struct {
	rdb     redis.UniversalClient
	ns      string
	timeout time.Duration
	// turns admits as many Redis calls at once as the client pools
	// connections (poolSize). A call waits for its turn here, for as long
	// as its context allows (a create's CreateTimeout), and only then
	// starts RedisTimeout, which so bounds the call itself. Without it a
	// burst of creates queued in go-redis's pool under RedisTimeout: over a
	// 2 ms link with a 2-connection pool, 400 cold pairs on two instances
	// timed out there, opened the breaker with Redis healthy (558 Redis
	// errors counted), and 397 were created without the cross-instance lock
	// (TestRealRedisBurstOverASlowLinkStaysCoordinated).
	turns   *semaphore.Weighted
	cb      *gobreaker.CircuitBreaker[struct{}]
	locker  *redislock.Client
	limiter *redis_rate.Limiter
	nodes   topology // the client, if it routes keys to nodes (see nodeLost)
	cluster masters  // the client, if it is a Cluster's (see Manager.keysLost)
	judged  judgment // what the Cluster last said of its failed masters
	log     *slog.Logger
	errs    *atomic.Int64 // Stats().RedisErrors
	// born and heard time Redis's last answer: heard is when a call last
	// succeeded or was answered (see answered), as time since born on the
	// monotonic clock, so that the breaker can ask how long Redis has been
	// silent.
	born  time.Time
	heard atomic.Int64
	// closed is set by Close once background work has stopped: its last
	// try at what waits for Redis (see settleAtClose) is one bounded try
	// with nothing left to protect, so it does not wait out an open
	// breaker's cooldown.
	closed atomic.Bool
	// refusedAt is when Redis began refusing writes (see refusesWrites),
	// as time since born; 0 while it takes them. refusalLogged is set
	// once a create has said it goes without the lock, and refused tells
	// which of the sandboxes' refused writes are logged at Warn (see
	// Manager.redisFailureLevel): the episode ends when a write is taken,
	// not at any answer, since reads go on succeeding.
	refusedAt     atomic.Int64
	refusalLogged atomic.Bool
	refused       failureEpisode
	// failing tells which failed calls of sandboxes and Removes are logged
	// at Warn (see Manager.redisFailureLevel).
	failing failureEpisode
	// evicts says whether a master evicts keys when full, as the masters
	// last answered (see Manager.checkEviction).
	evicts atomic.Bool
}

// silent reports whether Redis has answered no call for RedisTimeout. The
// breaker opens only then: failures among answers are calls cut short on
// this side of Redis. In a burst of cold creates on a busy host (8
// instances of a 3-node Cluster client, 2,000 Acquires, under the race
// detector on two CPUs) calls queued for the CPU past RedisTimeout while
// Redis answered the others within it; three of them in a row opened the
// breaker, and up to 75 of 100 pairs were created without the lock, some
// twice. A Redis that stalls or goes away answers nothing, and the breaker
// opens at most RedisTimeout later than it did on three failures alone.
func (st *store) silent() bool {
	return time.Since(st.born)-time.Duration(st.heard.Load()) >= st.timeout
}

func newStore(cfg Config, log *slog.Logger, errs *atomic.Int64) *store {
	cooldown := cfg.breakerCooldown
	st := &store{rdb: cfg.Redis, ns: cfg.Namespace, timeout: cfg.RedisTimeout, log: log, errs: errs, born: time.Now(),
		failing: failureEpisode{again: "sandboxpool: Redis answers again"},
		turns:   semaphore.NewWeighted(int64(poolSize(cfg.Redis))),
		locker:  redislock.New(cfg.Redis), limiter: redis_rate.NewLimiter(cfg.Redis)}
	st.nodes, _ = cfg.Redis.(topology)
	st.cluster, _ = cfg.Redis.(masters)
	st.cb = gobreaker.NewCircuitBreaker[struct{}](gobreaker.Settings{
		Name:        "sandboxpool-redis",
		MaxRequests: 1,
		Timeout:     cooldown,
		ReadyToTrip: func(c gobreaker.Counts) bool { return c.ConsecutiveFailures >= breakerTrips && st.silent() },
		// A missing key or a bad one is an answer, not a failure.
		IsSuccessful: heardFrom,
		// The caller giving up says nothing about Redis.
		IsExcluded: endedHere,
		OnStateChange: func(_ string, from, to gobreaker.State) {
			log.LogAttrs(context.Background(), breakerLevel(from, to), "sandboxpool: Redis circuit breaker", slog.String("from", from.String()), slog.String("to", to.String()))
		},
	})
	return st
}

// do runs one Redis call through the breaker (see bounded). A missing key
// is no error; a call that ended on this side (see endedHere) returns its
// error, not counted; other answered errors (see answered) are returned as
// they are, and every other error wraps errRedisUnavailable.
func (st *store) do(ctx context.Context, fn func(context.Context) error) error {
	// The turn comes before the breaker, so the breaker rules on a call
	// when it can run: behind a stalled Redis, calls queued for turns fail
	// as soon as it opens, as calls arriving then do, instead of taking
	// RedisTimeout each.
	err := st.bounded(ctx, func(call context.Context) error {
		run := func() (struct{}, error) {
			err := endedBy(ctx, fn(call))
			if heardFrom(err) {
				st.heard.Store(int64(time.Since(st.born)))
			}
			return struct{}{}, err
		}
		if st.closed.Load() {
			_, err := run()
			return err
		}
		_, err := st.cb.Execute(run)
		return err
	})
	switch {
	case err == nil || errors.Is(err, redis.Nil):
		st.failing.succeeded(ctx, st.log)
		return nil
	case endedHere(err):
		return err
	}
	st.errs.Add(1)
	if answered(err) {
		return err
	}
	st.nodeLost(ctx, err)
	if refusesWrites(err) {
		st.refusalSince(st.sinceBorn())
	}
	return fmt.Errorf("%w: %w", errRedisUnavailable, err)
}

// bounded runs fn with a Redis turn held and RedisTimeout on its context;
// ctx alone bounds the wait for the turn. A call that fails once ctx has
// ended was cut short by its caller, not by RedisTimeout: it returns
// errEndedByCaller.
func (st *store) bounded(ctx context.Context, fn func(context.Context) error) error {
	if err := st.turns.Acquire(ctx, 1); err != nil {
		return fmt.Errorf("%w: %w", errNoTurn, context.Cause(ctx))
	}
	defer st.turns.Release(1)
	call, cancel := context.WithTimeout(ctx, st.timeout)
	defer cancel()
	return endedBy(ctx, fn(call))
}

// endedBy marks err as errEndedByCaller if ctx, the caller's, has ended:
// then the caller cut the call short, not RedisTimeout.
func endedBy(ctx context.Context, err error) error {
	if err == nil || ctx.Err() == nil || errors.Is(err, errEndedByCaller) {
		return err
	}
	return fmt.Errorf("%w: %w", errEndedByCaller, err)
}

// poolSize is how many connections rdb pools: PoolSize, or MaxActiveConns
// if that is smaller. A Cluster or a Ring pools that many per node, and
// counts as one node: the calls of a burst need not spread evenly over the
// nodes, and those queued at one node's pool would time out there
// (multiplied by its three nodes, the turns let a Cluster stampede under
// load count Redis errors in two runs of eight; per node, none in eight).
// A size left to go-redis's default (which a Ring's options still show as
// 0), and a client of another type (a wrapper), count go-redis's default.
func poolSize(rdb redis.UniversalClient) int {
	o, _ := optionsOf(rdb)
	size := o.poolSize
	if size <= 0 {
		size = defaultPoolSize * runtime.GOMAXPROCS(0)
	}
	if o.maxActiveConns > 0 {
		size = min(size, o.maxActiveConns)
	}
	return size
}

// defaultPoolSize is go-redis's default pool size per GOMAXPROCS.
const defaultPoolSize = 10

// degraded reports whether the breaker is not closed.
func (st *store) degraded() bool { return st.cb.State() != gobreaker.StateClosed }

// outlive returns ctx while it lasts, and once it has ended a context that
// outlives it by RedisTimeout: for a Redis call that undoes what a create
// took (its lock, its quota place), which must reach Redis even when Close
// cut the create short.
func (m *Manager) outlive(ctx context.Context) (context.Context, context.CancelFunc) {
	if ctx.Err() == nil {
		return ctx, func() {}
	}
	return context.WithTimeout(context.WithoutCancel(ctx), m.cfg.RedisTimeout)
}

// ping probes Redis through the breaker.
func (st *store) ping(ctx context.Context) error {
	return st.do(ctx, func(ctx context.Context) error { return st.rdb.Ping(ctx).Err() })
}

// probeLoop, while Redis is degraded or something waits for it, pings it
// every interval (so recovery is noticed with no traffic) and, once it
// answers, publishes the sandboxes and makes the removals it missed.
func (m *Manager) probeLoop(interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-m.done:
			return
		case <-t.C:
		}
		if !m.store.degraded() && !m.waitsForRedis() {
			continue
		}
		ctx, cancel := context.WithTimeout(m.baseCtx, visitTimeout)
		if m.store.ping(ctx) == nil && !m.store.degraded() {
			m.catchUp(ctx)
		}
		cancel()
	}
}

// settleTimeout bounds Close's last try at what waits for Redis: a Redis
// that stalls costs a shutdown RedisTimeout (each step stops at its first
// failure), and a long backlog cannot hold it past this.
const settleTimeout = visitTimeout

// settleAtClose is Close's last try at what waits for Redis, once
// background work (probeLoop among it) has stopped, past an open breaker
// if Redis answers a ping: it publishes the sandboxes created while Redis
// was down, so that another instance reuses them instead of creating new
// ones, and makes the removals Redis did not answer. What is left is
// logged.
func (m *Manager) settleAtClose(ctx context.Context) {
	if m.store == nil || !m.waitsForRedis() {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, settleTimeout)
	defer cancel()
	m.store.closed.Store(true)
	if m.store.ping(ctx) == nil {
		m.catchUp(ctx)
	}
	if unpublished, unannounced := m.unpublishedCount(), m.unannouncedCount(); unpublished > 0 || unannounced > 0 {
		m.log.LogAttrs(ctx, slog.LevelWarn, "sandboxpool: close: Redis did not answer; other instances cannot reuse the sandboxes created while it was down, and find those removed gone only at their next probe",
			slog.Int("unpublished", unpublished), slog.Int("removals", unannounced))
	}
}

// waitsForRedis reports whether sandboxes wait to be published or
// removals to be made (see catchUp).
func (m *Manager) waitsForRedis() bool {
	return m.unpublishedCount() > 0 || m.unannouncedCount() > 0
}

// unpublishedCount is how many sandboxes wait to be published.
func (m *Manager) unpublishedCount() int {
	m.unpubMu.Lock()
	defer m.unpubMu.Unlock()
	return len(m.unpublished)
}

// awaitsCatchUp reports whether s waits to be published while removals
// wait to be made. Its pair's record may then still name a sandbox this
// instance removed, which would make s look like that sandbox's duplicate:
// only catchUp, which makes the removals first, writes s to Redis, and no
// record judges s before then. (The reaper may come first: it ticks while
// the probe, or a call the breaker let through again, finds that Redis
// answers.)
func (m *Manager) awaitsCatchUp(s *slot) bool {
	if m.unannouncedCount() == 0 {
		return false
	}
	m.unpubMu.Lock()
	defer m.unpubMu.Unlock()
	_, ok := m.unpublished[s]
	return ok
}

// catchUp makes what waited for Redis to answer again: the removals it
// did not answer first, then the publication of the sandboxes created
// meanwhile, and only once every removal is made. In that order because a
// removed sandbox's record, still in Redis, would make a sandbox created
// for the pair since (a Remove then an Acquire, or a condemned sandbox
// replaced, during the outage) look like a duplicate of it, and retire it.
// One runs at a time (Close may be called from several goroutines), so
// that no publication overtakes another catchUp's removals; one whose ctx
// ends while it waits for its turn does nothing.
func (m *Manager) catchUp(ctx context.Context) {
	if m.catchingUp.Acquire(ctx, 1) != nil {
		return
	}
	defer m.catchingUp.Release(1)
	if m.flushRemovals(ctx) {
		m.reconcile(ctx)
	}
}

// reconcile publishes the sandboxes created while Redis was down, with
// their quota places. Where another instance published a different sandbox
// for the pair meanwhile, that one is canonical: ours is superseded
// (retired and left to its provider deadline: another instance may have
// adopted it meanwhile). A record no Acquire would be given (past MaxAge,
// see Manager.stale) is not canonical: ours is written over it.
func (m *Manager) reconcile(ctx context.Context) {
	m.unpubMu.Lock()
	pending := make([]*slot, 0, len(m.unpublished))
	for s := range m.unpublished {
		pending = append(pending, s)
	}
	m.unpubMu.Unlock()
	for _, s := range pending {
		if s.state() == stateLive {
			id, err := m.adopt(ctx, s, s.deadline.Load())
			if err != nil {
				return // Redis failed again: retry on the next probe
			}
			if id != s.id {
				m.log.LogAttrs(ctx, slog.LevelDebug, "sandboxpool: duplicate from the Redis outage retired", slog.String("sandbox", s.id), slog.String("kept", id))
				m.supersede(ctx, s)
			} else {
				m.refreshReservation(ctx, s.key, s.deadline.Load()) // counted by the quotas from now on
			}
		}
		m.unpubMu.Lock()
		delete(m.unpublished, s)
		m.unpubMu.Unlock()
	}
}

func (m *Manager) markUnpublished(s *slot) {
	m.unpubMu.Lock()
	m.unpublished[s] = struct{}{}
	m.unpubMu.Unlock()
}
