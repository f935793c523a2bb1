package sandboxpool_test

// Multi-instance tests against real redis-server processes on free loopback
// ports (internal/redistest): skipped locally without redis-server, a
// failure in CI.

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sandboxpool/sandboxpool"
	fp "github.com/sandboxpool/sandboxpool/internal/fakeprovider"
	"github.com/sandboxpool/sandboxpool/internal/redistest"
)

// instances builds n Managers, each with its own Redis client from newClient.
func instances(t *testing.T, n int, p *fp.Provider, newClient func() redis.UniversalClient, mutate ...func(*sandboxpool.Config)) []*sandboxpool.Manager {
	t.Helper()
	ms := make([]*sandboxpool.Manager, n)
	for i := range ms {
		cfg := sandboxpool.Config{Provider: p, Redis: newClient()}
		sandboxpool.FastRedisRecovery(&cfg, 100*time.Millisecond)
		for _, f := range mutate {
			f(&cfg)
		}
		m, err := sandboxpool.New(cfg)
		require.NoError(t, err)
		t.Cleanup(func() { _ = m.Close(context.Background()) })
		ms[i] = m
	}
	return ms
}

// patientRedis gives the stampede tests a RedisTimeout of 10 s. Their
// bursts (8 instances, up to 2,000 Acquires at once), under the race
// detector on two CPUs shared with other test binaries and two busy
// loops, held single Redis calls for up to 0.76 s, past the default
// 0.5 s; then Redis answered nothing for RedisTimeout as this process saw
// it, the breaker opened, and pairs were created without the lock, as a
// stalled Redis would have them. These tests check coordination across
// instances; a call cut short by RedisTimeout among answers is
// TestRedisFailuresAmongAnswersKeepCreatesCoordinated's subject, and a
// burst queued at the client's pool at the default timeout is
// TestRealRedisBurstOverASlowLinkStaysCoordinated's.
func patientRedis(c *sandboxpool.Config) { c.RedisTimeout = 10 * time.Second }

func sumStats(ms []*sandboxpool.Manager) (total sandboxpool.Stats) {
	for _, m := range ms {
		st := m.Stats()
		total.Creates += st.Creates
		total.CacheHits += st.CacheHits
		total.MemoryHits += st.MemoryHits
		total.DegradedCreates += st.DegradedCreates
		total.RedisErrors += st.RedisErrors
		total.Acquires += st.Acquires
		total.Adopted += st.Adopted
	}
	return total
}

// stampede runs acquires concurrent Acquires spread over pairs pairs and
// managers; it returns the errors.
func stampede(t *testing.T, ms []*sandboxpool.Manager, acquires, pairs int, timeout time.Duration) []error {
	t.Helper()
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
		ids  sync.Map
	)
	start := make(chan struct{})
	for i := range acquires {
		wg.Go(func() {
			<-start
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			pair := i % pairs
			l, err := ms[i%len(ms)].Acquire(ctx, fmt.Sprint("user", pair%10), fmt.Sprint("proj", pair))
			if err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
				return
			}
			if prev, loaded := ids.LoadOrStore(pair, l.Sandbox().ID); loaded && prev != l.Sandbox().ID {
				mu.Lock()
				errs = append(errs, fmt.Errorf("pair %d got %s and %s", pair, prev, l.Sandbox().ID))
				mu.Unlock()
			}
			l.Release()
		})
	}
	close(start)
	wg.Wait()
	return errs
}

// 8 instances with their own clients, 2,000 concurrent Acquires over 100
// pairs: exactly 100 creates.
func TestRealRedisEightInstancesOneSandboxPerPair(t *testing.T) {
	srv := redistest.Start(t)
	p := fp.New()
	p.SetLatency(fp.OpCreate, 20*time.Millisecond)
	ms := instances(t, 8, p, func() redis.UniversalClient { return srv.Client(t) }, patientRedis)
	errs := stampede(t, ms, 2000, 100, 30*time.Second)
	st := sumStats(ms)
	require.Empty(t, errs)
	assert.EqualValues(t, 0, st.DegradedCreates, "created without the lock")
	assert.EqualValues(t, 0, st.RedisErrors)
	assert.EqualValues(t, 100, p.Calls(fp.OpCreate), "creates per pair: exactly one")
	assert.EqualValues(t, 100, st.Creates)
	assert.Len(t, p.Alive(), 100)
	t.Logf("2000 acquires over 100 pairs on 8 instances: %d creates, %d Redis hits, %d memory hits", st.Creates, st.CacheHits, st.MemoryHits)

	// A restarted instance (closed without killing, built anew) reuses all.
	require.NoError(t, ms[0].Close(context.Background()))
	fresh := instances(t, 1, p, func() redis.UniversalClient { return srv.Client(t) })
	require.Empty(t, stampede(t, fresh, 100, 100, 10*time.Second))
	assert.EqualValues(t, 0, fresh[0].Stats().Creates, "same sandboxes, zero creates")
	assert.EqualValues(t, 100, fresh[0].Stats().CacheHits)
}

// A burst of cold pairs over a slow link (2 ms per request) to a healthy
// Redis, with small connection pools, stays coordinated: each Redis call
// waits for its turn within the create's deadline, and RedisTimeout bounds
// only the call itself. (Before, calls queued in go-redis's pool under
// RedisTimeout: they timed out there, opened the breaker, and the pairs
// were created without the cross-instance lock.)
func TestRealRedisBurstOverASlowLinkStaysCoordinated(t *testing.T) {
	srv := redistest.Start(t)
	link := redistest.StartLink(t, srv.Addr, 2*time.Millisecond)
	p := fp.New()
	ms := instances(t, 2, p, pooledClient(t, link.Addr, 2))
	errs := stampede(t, ms, 800, 400, time.Minute) // every pair from both instances at once
	st := sumStats(ms)
	require.Empty(t, errs)
	assert.EqualValues(t, 0, st.DegradedCreates, "created without the lock")
	assert.EqualValues(t, 0, st.RedisErrors)
	assert.False(t, ms[0].Stats().RedisDegraded || ms[1].Stats().RedisDegraded, "breaker opened on a healthy Redis")
	assert.EqualValues(t, 400, p.Calls(fp.OpCreate), "one create per pair")
}

// Behind a stalled Redis, calls queued for a Redis turn fail as soon as
// the breaker opens, as new calls do, instead of each taking RedisTimeout
// in turn: 200 cold pairs on a 2-connection pool all return in about two
// RedisTimeouts (50 s when queued calls waited out theirs one pair of
// turns at a time).
func TestRealRedisBurstOnAStalledRedisFailsFast(t *testing.T) {
	srv := redistest.Start(t)
	p := fp.New()
	ms := instances(t, 1, p, pooledClient(t, srv.Addr, 2))
	srv.Pause()
	defer srv.Resume()
	start := time.Now()
	errs := stampede(t, ms, 200, 200, time.Minute)
	elapsed := time.Since(start)
	assert.Empty(t, errs, "memory-only creates while Redis is out")
	assert.EqualValues(t, 200, ms[0].Stats().DegradedCreates)
	assert.Less(t, elapsed, 10*time.Second, "queued calls waited out RedisTimeout one turn at a time")
}

// Removes under a handler's short deadline, over a link slower than that
// deadline, fail with the deadline, and do not open the breaker: the caller
// ended those calls, not RedisTimeout, so the next create still takes the
// lock. (Three such Removes in a row opened it before.)
func TestRealRedisCallerDeadlinesDoNotOpenTheBreaker(t *testing.T) {
	srv := redistest.Start(t)
	link := redistest.StartLink(t, srv.Addr, 150*time.Millisecond)
	p := fp.New()
	m := instances(t, 1, p, pooledClient(t, link.Addr, 0), func(c *sandboxpool.Config) { c.RedisTimeout = 5 * time.Second })[0] // the link is slow, not down
	for range 4 {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		err := m.Remove(ctx, "u", "p")
		cancel()
		assert.ErrorIs(t, err, context.DeadlineExceeded)
	}
	require.False(t, m.Stats().RedisDegraded, "the breaker opened on the callers' deadlines")
	assert.EqualValues(t, 0, m.Stats().RedisErrors)
	acquireID(t, m, "u", "q")
	assert.EqualValues(t, 0, m.Stats().DegradedCreates, "created without the lock")
}

// Quotas hold exactly across instances under concurrency on a real Redis.
func TestRealRedisQuotasExact(t *testing.T) {
	srv := redistest.Start(t)
	p := fp.New()
	ms := instances(t, 8, p, func() redis.UniversalClient { return srv.Client(t) }, patientRedis,
		func(c *sandboxpool.Config) { c.MaxSandboxes = 25; c.MaxPerUser = 4 })
	errs := stampede(t, ms, 400, 200, 30*time.Second)
	refused := 0
	for _, err := range errs {
		require.ErrorIs(t, err, sandboxpool.ErrQuotaExceeded)
		refused++
	}
	assert.Len(t, p.Alive(), 25, "exactly MaxSandboxes alive")
	assert.EqualValues(t, 25, p.Calls(fp.OpCreate))
	assert.Positive(t, refused)
}

// Redis killed mid-run and restarted: requests keep succeeding within their
// timeouts, and every instance's breaker closes again.
// outageClient makes clients for addr whose calls fail fast while the
// server is down; each is closed at test end.
func outageClient(t *testing.T, addr string) func() redis.UniversalClient {
	return func() redis.UniversalClient {
		c := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: addr, MaxRetries: -1, DialTimeout: 200 * time.Millisecond,
			ReadTimeout: 200 * time.Millisecond, WriteTimeout: 200 * time.Millisecond})
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
}

// pooledClient makes clients for addr with poolSize connections (0: go-redis's
// default); each is closed at test end.
func pooledClient(t *testing.T, addr string, poolSize int) func() redis.UniversalClient {
	return func() redis.UniversalClient {
		c := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: addr, PoolSize: poolSize})
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
}

func TestRealRedisOutageAndRecovery(t *testing.T) {
	srv := redistest.Start(t)
	p := fp.New()
	ms := instances(t, 4, p, outageClient(t, srv.Addr))
	require.Empty(t, stampede(t, ms, 200, 20, 5*time.Second)) // warm: 20 pairs

	srv.Stop() // Redis dies before the new pairs arrive
	stop := load(t, ms, 2*time.Second, func(w, i int) int {
		return (w*7 + i) % 40 // 20 warm pairs, 20 new ones born during the outage
	})
	time.Sleep(time.Second)
	degraded := 0
	for _, m := range ms {
		if m.Stats().RedisDegraded {
			degraded++
		}
	}
	srv.Start() // and comes back, empty
	waitBreakersClosed(t, ms, "every breaker closes again")
	time.Sleep(300 * time.Millisecond)
	served, failed := stop()
	st := sumStats(ms)
	t.Logf("outage: %d served, %d failed, %d/%d instances degraded, %d degraded creates, %d creates for 40 pairs (%d duplicates during the outage)",
		served, failed, degraded, len(ms), st.DegradedCreates, p.Calls(fp.OpCreate), p.Calls(fp.OpCreate)-40)
	assert.Zero(t, failed, "requests keep succeeding within their timeouts")
	assert.Positive(t, degraded, "instances on the cold path noticed the outage")
	assert.Positive(t, served)
	// After recovery every pair is published once: the outage's duplicates
	// were retired by reconciliation, so new acquires agree on one sandbox.
	require.Eventually(t, func() bool { return len(p.Alive()) <= 40 }, 10*time.Second, 20*time.Millisecond, "duplicates retired: %d alive", len(p.Alive()))
	require.Empty(t, stampede(t, ms, 400, 40, 5*time.Second))
}

// A Redis out of memory (maxmemory with noeviction) answers reads and
// refuses every write: it cannot coordinate creates. The breaker does not
// see it, since the reads keep it closed, so a create that meets the
// refusal for RedisTimeout goes without the lock (counted), as it would
// with Redis down, and is published once Redis takes writes again.
// Before, such a create was tried again for as long as other calls were
// answered: here, for as long as b kept reconnecting a's pairs (a service
// whose instances share pairs does that all day), past the caller's
// deadline. (Taken for an answer, as WRONGTYPE is, OOM would instead fail
// every new pair's Acquire at once.)
func TestRealRedisOutOfMemoryDegradesAndRecovers(t *testing.T) {
	srv := redistest.Start(t, "--maxmemory", "8mb", "--maxmemory-policy", "noeviction")
	p := fp.New()
	ms := instances(t, 2, p, func() redis.UniversalClient { return srv.Client(t) })
	a, b := ms[0], ms[1]
	const shared = 600
	for i := range shared {
		acquireID(t, a, "w", fmt.Sprint("p", i))
	}
	hot := acquireID(t, b, "u", "hot")

	ctx := context.Background()
	admin := outOfMemory(t, srv)

	stop, reading := make(chan struct{}), make(chan struct{})
	go func() { // b reconnects a's pairs, one Redis read each, answered
		defer close(reading)
		for i := range shared {
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
			l, err := b.Acquire(ctx, "w", fmt.Sprint("p", i))
			if assert.NoError(t, err) {
				l.Release()
			}
		}
	}()
	defer func() { close(stop); <-reading }()

	assert.Equal(t, hot, acquireID(t, b, "u", "hot"), "memory hits need no Redis")
	actx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	cold := make([]string, 2)
	for i := range cold {
		l, err := b.Acquire(actx, "u", fmt.Sprint("cold", i))
		require.NoError(t, err, "a Redis that refuses writes held up a create")
		cold[i] = l.Sandbox().ID
		l.Release()
	}
	select {
	case <-reading:
		t.Fatal("b's reads ended before the creates: nothing kept the breaker closed")
	default:
	}
	st := b.Stats()
	assert.False(t, st.RedisDegraded, "Redis answered b's reads")
	assert.EqualValues(t, 2, st.DegradedCreates)
	assert.EqualValues(t, 2, st.UnpublishedSandboxes)

	assert.True(t, sandboxpool.RefusingWrites(b))
	require.NoError(t, admin.ConfigSet(ctx, "maxmemory", "0").Err())
	require.Eventually(t, func() bool { return b.Stats().UnpublishedSandboxes == 0 }, 10*time.Second, 10*time.Millisecond)
	assert.False(t, sandboxpool.RefusingWrites(b), "publishing ended the episode: the next refusal is waited out again")
	for i, id := range cold {
		assert.Equal(t, id, admin.HGet(ctx, fmt.Sprint("sandboxpool:{u:cold", i, "}:sbx"), "id").Val(), "published once Redis takes writes")
		assert.Equal(t, id, acquireID(t, a, "u", fmt.Sprint("cold", i)), "another instance reuses it")
	}
	assert.EqualValues(t, shared+3, p.Calls(fp.OpCreate))
}

// A refusal of writes shorter than RedisTimeout (a Redis at its memory
// limit that frees some as keys expire) is waited out: the create keeps
// trying under the lock, and makes no sandbox another instance could not
// find.
func TestRealRedisBriefRefusalOfWritesIsWaitedOut(t *testing.T) {
	srv := redistest.Start(t, "--maxmemory", "8mb", "--maxmemory-policy", "noeviction")
	p := fp.New()
	m := instances(t, 1, p, func() redis.UniversalClient { return srv.Client(t) }, patientRedis)[0]
	ctx := context.Background()
	admin := outOfMemory(t, srv)
	time.AfterFunc(200*time.Millisecond, func() { assert.NoError(t, admin.ConfigSet(ctx, "maxmemory", "0").Err()) })
	id := acquireID(t, m, "u", "p")
	st := m.Stats()
	assert.Zero(t, st.DegradedCreates)
	assert.Positive(t, st.RedisErrors, "the create met the refusal")
	assert.Equal(t, id, admin.HGet(ctx, "sandboxpool:{u:p}:sbx", "id").Val())
}

// A Redis that refuses writes is up: the breaker stays closed even with no
// read to answer (before, the refused keepalives alone opened it, and with
// it every read that still worked was refused too). The failing keepalive
// of every sandbox in use is logged at Warn for the first, at Debug for
// the rest of the episode; before, each logged a warning, for as long as
// Redis was full.
func TestRealRedisRefusedWritesWarnOnce(t *testing.T) {
	srv := redistest.Start(t, "--maxmemory", "8mb", "--maxmemory-policy", "noeviction")
	var logs syncBuffer
	m := instances(t, 1, fp.New(), func() redis.UniversalClient { return srv.Client(t) }, func(cfg *sandboxpool.Config) {
		cfg.IdleTimeout, cfg.MaxAge = 2*time.Second, time.Minute // keepalives every few hundred ms
		cfg.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	})[0]
	const inUse = 10
	for i := range inUse {
		l, err := m.Acquire(context.Background(), "u", fmt.Sprint("p", i))
		require.NoError(t, err)
		defer l.Release()
	}
	outOfMemory(t, srv)
	failed := func(level string) int {
		return strings.Count(logs.String(), "level="+level+` msg="sandboxpool: extending Redis deadline failed"`)
	}
	require.Eventually(t, func() bool { return failed("DEBUG")+failed("WARN") >= inUse }, 10*time.Second, 10*time.Millisecond,
		"every sandbox in use met the refusal at its keepalives")
	assert.Equal(t, 1, failed("WARN"))
	assert.False(t, m.Stats().RedisDegraded, "a refusal is an answer: Redis is up")
}

// A Redis that evicts keys when full drops create locks and records, and
// lets duplicates through: New warns of it, for each master that does.
// volatile-lru is the default of the managed Redis services, and every key
// the pool writes expires.
func TestRealRedisThatEvictsIsWarnedOf(t *testing.T) {
	ctx := context.Background()
	warnings := func(t *testing.T, rdb redis.UniversalClient) []string {
		var logs syncBuffer
		m := instances(t, 1, fp.New(), func() redis.UniversalClient { return rdb }, func(cfg *sandboxpool.Config) {
			cfg.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
		})[0]
		require.NoError(t, m.Close(ctx)) // waits for the check
		defer func() {
			assert.Equal(t, strings.Contains(logs.String(), "level=WARN"), m.Stats().RedisEvicts, "Stats().RedisEvicts says what the log says")
		}()
		var nodes []string
		for _, line := range strings.Split(logs.String(), "\n") {
			if strings.Contains(line, `level=WARN msg="sandboxpool: Redis evicts keys when full`) {
				nodes = append(nodes, line[strings.Index(line, "maxmemory_policy="):])
			}
			assert.NotContains(t, line, "cannot read Redis's eviction policy")
		}
		return nodes
	}
	srv := redistest.Start(t)
	admin := srv.Client(t)
	set := func(policy, max string) {
		require.NoError(t, admin.ConfigSet(ctx, "maxmemory-policy", policy).Err())
		require.NoError(t, admin.ConfigSet(ctx, "maxmemory", max).Err())
	}
	set("noeviction", "64mb")
	assert.Empty(t, warnings(t, srv.Client(t)), "noeviction: a full Redis refuses writes, and keeps what it has")
	set("allkeys-lru", "0")
	assert.Empty(t, warnings(t, srv.Client(t)), "no maxmemory: Redis evicts nothing")
	set("volatile-lru", "64mb")
	assert.Equal(t, []string{"maxmemory_policy=volatile-lru maxmemory=67108864 node=" + srv.Addr}, warnings(t, srv.Client(t)))

	// A Redis down when New ran is checked once it answers.
	down := redistest.Start(t, "--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru")
	down.Stop()
	var logs syncBuffer
	m := instances(t, 1, fp.New(), func() redis.UniversalClient { return down.Client(t) }, func(cfg *sandboxpool.Config) {
		cfg.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	})[0]
	time.Sleep(2 * sandboxpool.DefaultRedisTimeout) // its first try gives up after RedisTimeout; more, every 100 ms (FastRedisRecovery)
	down.Start()
	assert.Eventually(t, func() bool { return strings.Contains(logs.String(), "Redis evicts keys when full") }, 5*time.Second, 10*time.Millisecond)
	require.NoError(t, m.Close(ctx))
	assert.Equal(t, 1, strings.Count(logs.String(), "Redis evicts keys when full"))
	assert.True(t, m.Stats().RedisEvicts)

	cl := redistest.StartCluster(t, 3, 0)
	cc := cl.Client(t)
	require.NoError(t, cc.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error {
		if err := c.ConfigSet(ctx, "maxmemory", "64mb").Err(); err != nil {
			return err
		}
		return c.ConfigSet(ctx, "maxmemory-policy", "allkeys-lfu").Err()
	}))
	got := warnings(t, cl.Client(t))
	assert.Len(t, got, 3, "each master is checked: %v", got)
	for _, w := range got {
		assert.True(t, strings.HasPrefix(w, "maxmemory_policy=allkeys-lfu maxmemory=67108864 node=127.0.0.1:"), w)
	}
	assert.Len(t, slices.Compact(slices.Sorted(slices.Values(got))), 3, "three masters, not one three times")
}

// A Redis whose eviction policy changes while the Manager runs is read
// again (every minute; here every 20 ms): the change is logged once each
// way, and Stats().RedisEvicts follows it, so that an alert on it clears
// when the policy is mended. Before, the policy was read once, from New
// on: a Redis set to evict after the service started was never flagged,
// and one mended after went on being.
func TestRealRedisEvictionPolicyChangedLiveIsFollowed(t *testing.T) {
	ctx := context.Background()
	srv := redistest.Start(t, "--maxmemory", "64mb", "--maxmemory-policy", "noeviction")
	admin := srv.Client(t)
	var logs syncBuffer
	m := instances(t, 1, fp.New(), func() redis.UniversalClient { return srv.Client(t) }, func(cfg *sandboxpool.Config) {
		cfg.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
		sandboxpool.EvictionRecheck(cfg, 20*time.Millisecond)
	})[0]
	count := func(msg string) int { return strings.Count(logs.String(), `msg="sandboxpool: `+msg) }
	policy := func(p string) { require.NoError(t, admin.ConfigSet(ctx, "maxmemory-policy", p).Err()) }
	settled := func() { time.Sleep(200 * time.Millisecond) } // ten rechecks

	settled()
	assert.False(t, m.Stats().RedisEvicts)
	policy("volatile-lru")
	require.Eventually(t, func() bool { return m.Stats().RedisEvicts }, 5*time.Second, 10*time.Millisecond, "the new policy was never read")
	settled()
	assert.Equal(t, 1, count("Redis evicts keys when full"), "once, not at every recheck")
	assert.True(t, m.Stats().RedisEvicts)

	policy("noeviction")
	require.Eventually(t, func() bool { return !m.Stats().RedisEvicts }, 5*time.Second, 10*time.Millisecond, "the mend was never read")
	settled()
	assert.Equal(t, 1, count("Redis no longer evicts keys"))
	assert.Contains(t, logs.String(), `level=INFO msg="sandboxpool: Redis no longer evicts keys" maxmemory_policy=noeviction maxmemory=67108864 node=`+srv.Addr)

	policy("allkeys-lru")
	require.Eventually(t, func() bool { return m.Stats().RedisEvicts }, 5*time.Second, 10*time.Millisecond)
	assert.Eventually(t, func() bool { return count("Redis evicts keys when full") == 2 }, 5*time.Second, 10*time.Millisecond, "evicting again is news again")
	require.NoError(t, m.Close(ctx))
	assert.Equal(t, 2, count("Redis evicts keys when full"))
	assert.Equal(t, 1, count("Redis no longer evicts keys"))
}

// A Ring's shard that evicts is warned of once, not again each time it
// comes back from being down: ForEachShard does not ask a shard the Ring
// holds down, and the check must not take its silence for the shard
// having left.
func TestRealRedisRingShardBackFromDownIsNotWarnedOfAgain(t *testing.T) {
	evicting := redistest.Start(t, "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
	other := redistest.Start(t)
	ring := redis.NewRing(&redis.RingOptions{ContextTimeoutEnabled: true, HeartbeatFrequency: 20 * time.Millisecond,
		Addrs: map[string]string{"a": evicting.Addr, "b": other.Addr}})
	t.Cleanup(func() { _ = ring.Close() })
	var logs syncBuffer
	m := instances(t, 1, fp.New(), func() redis.UniversalClient { return ring }, func(cfg *sandboxpool.Config) {
		cfg.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
		sandboxpool.EvictionRecheck(cfg, 20*time.Millisecond)
	})[0]
	warned := func() int { return strings.Count(logs.String(), "Redis evicts keys when full") }
	require.Eventually(t, func() bool { return warned() == 1 }, 5*time.Second, 10*time.Millisecond)
	shardsUp := func() int64 { // the shards ForEachShard asks: those the Ring does not hold down
		var n atomic.Int64
		_ = ring.ForEachShard(context.Background(), func(context.Context, *redis.Client) error { n.Add(1); return nil })
		return n.Load()
	}

	evicting.Stop()
	require.Eventually(t, func() bool { return shardsUp() == 1 }, 5*time.Second, 10*time.Millisecond, "the Ring never held the shard down")
	time.Sleep(200 * time.Millisecond) // rechecks, the shard down
	assert.True(t, m.Stats().RedisEvicts, "a shard down is not a shard mended")
	evicting.Start()
	require.Eventually(t, func() bool { return shardsUp() == 2 }, 5*time.Second, 10*time.Millisecond, "the Ring never took the shard back")
	time.Sleep(200 * time.Millisecond) // rechecks, the shard back
	require.NoError(t, m.Close(context.Background()))
	assert.Equal(t, 1, warned(), "warned of again when it came back")
	assert.NotContains(t, logs.String(), "no longer evicts")
	assert.True(t, m.Stats().RedisEvicts)
}

// outOfMemory fills srv (started with a maxmemory and noeviction) until it
// refuses writes, then lowers its maxmemory well below what it holds, so
// that it refuses every write, and returns a client for it.
func outOfMemory(t *testing.T, srv *redistest.Server) *redis.Client {
	ctx := context.Background()
	admin := srv.Client(t)
	for i := 0; admin.Set(ctx, fmt.Sprint("filler", i), strings.Repeat("x", 100<<10), 0).Err() == nil; i++ {
		require.Less(t, i, 1000, "Redis never refused a write")
	}
	require.NoError(t, admin.ConfigSet(ctx, "maxmemory", "1mb").Err())
	require.ErrorContains(t, admin.Set(ctx, "probe", "x", 0).Err(), "OOM")
	return admin
}

// The multi-instance test on a real 3-master Redis Cluster.
func TestRealRedisClusterOneSandboxPerPair(t *testing.T) {
	cl := redistest.StartCluster(t, 3, 0)
	p := fp.New()
	p.SetLatency(fp.OpCreate, 20*time.Millisecond)
	ms := instances(t, 8, p, func() redis.UniversalClient { return cl.Client(t) }, patientRedis,
		func(c *sandboxpool.Config) {
			c.MaxSandboxes = 1000
			c.MaxPerUser = 100
			c.CreateLimit = sandboxpool.RateLimit{Rate: 1000, Per: time.Second}
		})
	errs := stampede(t, ms, 2000, 100, 30*time.Second)
	st := sumStats(ms)
	require.Empty(t, errs)
	assert.EqualValues(t, 0, st.DegradedCreates, "created without the lock")
	assert.EqualValues(t, 0, st.RedisErrors)
	assert.EqualValues(t, 100, p.Calls(fp.OpCreate))
	assert.Len(t, p.Alive(), 100)
	t.Logf("cluster: 2000 acquires over 100 pairs on 8 instances: %d creates", st.Creates)

	// A Remove on one instance is heard by all eight through the cluster's
	// Pub/Sub: none hands the removed sandbox out afterwards.
	ctx := context.Background()
	held := make([]string, len(ms))
	for i, m := range ms {
		l, err := m.Acquire(ctx, "user0", "proj0")
		require.NoError(t, err)
		held[i] = l.Sandbox().ID
		l.Release()
	}
	removed := held[0]
	require.Equal(t, slices.Repeat([]string{removed}, len(ms)), held, "every instance holds the pair's sandbox")
	require.NoError(t, ms[0].Remove(ctx, "user0", "proj0"))
	require.Eventually(t, func() bool {
		for _, m := range ms[1:] {
			l, err := m.Acquire(ctx, "user0", "proj0")
			if err != nil {
				return false
			}
			id := l.Sandbox().ID
			l.Release()
			if id == removed {
				return false
			}
		}
		return true
	}, 10*time.Second, 10*time.Millisecond, "every instance forgets the removed sandbox")
	assert.NotContains(t, p.Alive(), removed)
}

// A Redis Cluster whose masters fail, one after the other, each with a
// replica to take over: README advises replicas so that the failover, not
// the breaker, carries the outage. Three failovers: a master that serves
// no slot of the removal channel crashes (its connections are reset);
// then the channel's master crashes; then, once that one is back as the
// replica of the master that took its place, that master hangs (SIGSTOP:
// its connections stay open and nothing answers), as a host that froze.
// Four busy instances keep serving throughout (memory hits from memory;
// new pairs, asked for from the failure on, wait out the failover within
// their deadline where the failed master served their slot, or are
// created without the lock while a breaker is open), their breakers close
// once the replica serves, and every pair ends with one sandbox served by
// all four. After each failover of the channel's master every
// subscription has moved to the new one, that of a fifth instance too,
// which makes no Redis call of its own (it probes Redis once an hour).
// Then a Remove reaches every instance at once: probes of sandboxes are an
// hour apart, so only announcements tell an instance that a sandbox is
// gone.
//
// Before, a Cluster client kept routing a failed master's slots to its
// address for up to a minute (go-redis reads the cluster's map again on
// MOVED, and otherwise every ClusterStateReloadInterval): new pairs there
// failed at their 15 s deadline, the pairs took longer than 15 s to
// converge, and a subscription stayed with the dead master.
func TestRealRedisClusterFailoverIsCarriedByTheReplica(t *testing.T) {
	// Registered first, so run last, after the clients are closed: a
	// go-redis pool whose dials failed probes its dead node once a second
	// until the client is closed, and goleak must not find that probe.
	t.Cleanup(func() { waitGoroutinesGone(t, "(*ConnPool).tryDial", 3*time.Second) })
	cl := redistest.StartCluster(t, 3, 1)
	p := fp.New()
	ms, idle, removed := failoverInstances(t, p, lossClient(t, cl))
	channel := "sandboxpool:removed"
	waitSubscribed(t, cl.MasterOf(channel), int64(len(ms)+1))

	pairs := failoverBatch
	failover := func(victim *redistest.Server, fail func()) {
		t.Helper()
		pairs = throughFailover(t, ms, p, pairs, victim.Addr, fail, func() { cl.WaitFailover(victim) })
	}

	masters := cl.Masters()
	channelMaster := cl.MasterOf(channel)
	other := masters[slices.IndexFunc(masters, func(s *redistest.Server) bool { return s != channelMaster })]
	failover(other, other.Stop)
	failover(channelMaster, channelMaster.Stop)
	waitSubscribed(t, cl.MasterOf(channel), int64(len(ms)+1))
	cl.Rejoin(channelMaster) // the replica of the master that took its place
	promoted := cl.MasterOf(channel)
	failover(promoted, promoted.Pause)

	// Every subscription followed the channel's slot to the new master.
	waitSubscribed(t, cl.MasterOf(channel), int64(len(ms)+1))
	removalReachesEveryInstance(t, ms, idle, removed)
	require.Empty(t, stampede(t, ms, 400, pairs, 10*time.Second))
}

// A Cluster that serves the slots of the masters that answer while one
// is down (cluster-require-full-coverage no) loses a master that has no
// replica, while four instances serve with quotas, for longer than their
// callers wait: the master crashes and comes back empty, then it hangs
// and resumes. The other masters go on answering, so the breakers stay
// closed; once the Cluster judges the master failed, the creates of its
// pairs go without the lock (see Manager.keysLost). No Acquire fails, and
// once the master is back what was created meanwhile is published and
// every pair converges (see carried). Before, each create of a pair on the
// lost master's slots tried again until its caller gave up: a third of
// the new pairs failed for as long as the master was down.
func TestRealRedisClusterMasterLostWithoutAReplicaServesItsPairs(t *testing.T) {
	t.Cleanup(func() { waitGoroutinesGone(t, "(*ConnPool).tryDial", 3*time.Second) }) // as in the failover test
	cl := redistest.StartCluster(t, 3, 0, "--cluster-require-full-coverage", "no")
	p := fp.New()
	ms, idle, removed := failoverInstances(t, p, lossClient(t, cl))
	// The master lost holds neither the removal channel nor the quota
	// set of all pairs: their own users' sets and a third of the pairs.
	keep := []*redistest.Server{cl.MasterOf("sandboxpool:removed"), cl.MasterOf("sandboxpool:live")}
	masters := cl.Masters()
	lost := masters[slices.IndexFunc(masters, func(s *redistest.Server) bool { return !slices.Contains(keep, s) })]
	pairs := failoverBatch
	for _, loss := range []struct {
		name string
		fail func()
	}{{"crash", lost.Stop}, {"hang", lost.Pause}} {
		degraded := sumStats(ms).DegradedCreates
		var redisErrors int64
		pairs, redisErrors = carried(t, ms, p, pairs, loss.name+" of the master "+lost.Addr, loss.fail, func() {
			cl.WaitFailed(lost)
			time.Sleep(acquireWait) // every caller that waited on the lost master's pairs has given up, unless served
			cl.Return(lost)
		})
		assert.Positive(t, redisErrors, "the loss met the instances")
		assert.Greater(t, sumStats(ms).DegradedCreates, degraded, "the lost master's pairs were created without the lock")
	}
	removalReachesEveryInstance(t, ms, idle, removed)
	require.Empty(t, stampede(t, ms, 400, pairs, 10*time.Second))
}

// A master watched by Redis Sentinel hangs (SIGSTOP: its connections stay
// open and nothing answers), and the sentinel promotes its replica; the
// hung master comes back and the sentinel makes it the replica; then the
// new master crashes (SIGKILL: its connections are refused), and the
// sentinel promotes the old one again. Instances on go-redis's failover
// client carry both failovers as they carry a Cluster's (see
// throughFailover), and every subscription moves to the master of the
// moment, an idle instance's too, so that a Remove reaches every instance
// at once. (go-redis follows the sentinel's word: the Manager needs
// nothing of its own here.)
func TestRealRedisSentinelFailoverIsCarriedByTheReplica(t *testing.T) {
	t.Cleanup(func() { waitGoroutinesGone(t, "(*ConnPool).tryDial", 3*time.Second) }) // as in the Cluster's test
	sn := redistest.StartSentinel(t)
	p := fp.New()
	newClient := func() redis.UniversalClient {
		c := redis.NewFailoverClient(&redis.FailoverOptions{ContextTimeoutEnabled: true, MasterName: sn.MasterName, SentinelAddrs: []string{sn.Addr},
			DialTimeout: 200 * time.Millisecond, ReadTimeout: 500 * time.Millisecond, WriteTimeout: 500 * time.Millisecond})
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
	ms, idle, removed := failoverInstances(t, p, newClient)
	waitSubscribed(t, sn.Master, int64(len(ms)+1))
	hung := sn.Master
	pairs := throughFailover(t, ms, p, failoverBatch, hung.Addr, hung.Pause, sn.WaitFailover)
	waitSubscribed(t, sn.Master, int64(len(ms)+1))
	sn.Rejoin() // hung, now the replica
	crashed := sn.Master
	pairs = throughFailover(t, ms, p, pairs, crashed.Addr, crashed.Stop, sn.WaitFailover)
	waitSubscribed(t, sn.Master, int64(len(ms)+1))
	removalReachesEveryInstance(t, ms, idle, removed)
	require.Empty(t, stampede(t, ms, 400, pairs, 10*time.Second))
}

// A Cluster resharded while four instances serve: a third of the slots,
// with the keys in them (records, locks, quota sets), move from one master
// to another (redis-cli --cluster reshard, as an operator or a managed
// service's online resharding does). Every Acquire is served and every
// pair converges, as through a failover (see carried); the removal
// subscription and a Remove still reach every instance. go-redis follows
// the MOVED and ASK replies; the pair's keys share a slot, so each script
// finds its keys together, before or after the move.
func TestRealRedisClusterReshardingIsCarried(t *testing.T) {
	cl := redistest.StartCluster(t, 3, 0)
	p := fp.New()
	ms, idle, removed := failoverInstances(t, p, func() redis.UniversalClient { return cl.Client(t) })
	masters := cl.Masters()
	var wait func()
	pairs, _ := carried(t, ms, p, failoverBatch, "resharding", func() { wait = cl.Reshard(masters[0], masters[1], 5000) }, func() { wait() })
	removalReachesEveryInstance(t, ms, idle, removed)
	require.Empty(t, stampede(t, ms, 400, pairs, 10*time.Second))
}

// lossClient makes clients for cl that find a node lost fast: a dial
// fails within 200 ms, a reply is waited for 500 ms. Each is closed at
// test end.
func lossClient(t *testing.T, cl *redistest.Cluster) func() redis.UniversalClient {
	return func() redis.UniversalClient {
		c := redis.NewClusterClient(&redis.ClusterOptions{ContextTimeoutEnabled: true, Addrs: cl.Addrs,
			DialTimeout: 200 * time.Millisecond, ReadTimeout: 500 * time.Millisecond, WriteTimeout: 500 * time.Millisecond})
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
}

// failoverBatch is how many new pairs a failover test asks for: before
// the first failure, then from each failure on.
const failoverBatch = 40

// failoverInstances builds the instances of a failover test, each with
// its own client from newClient: four busy ones, which serve
// failoverBatch pairs before it returns, and an idle one, which makes no
// Redis call of its own (it probes Redis once an hour) and holds the pair
// (user0, proj0), whose sandbox it returns. Probes of sandboxes are an
// hour apart, so only announcements tell an instance that a sandbox is
// gone.
func failoverInstances(t *testing.T, p *fp.Provider, newClient func() redis.UniversalClient) (ms []*sandboxpool.Manager, idle *sandboxpool.Manager, removed string) {
	t.Helper()
	cfg := func(c *sandboxpool.Config) {
		c.HealthCheckAfter = time.Hour
		c.MaxSandboxes = 1000 // quotas far above the load, so that their keys fail over too
		c.MaxPerUser = 100
	}
	ms = instances(t, 4, p, newClient, cfg)
	idle = instances(t, 1, p, newClient, cfg, func(c *sandboxpool.Config) { sandboxpool.SlowRedisProbe(c, time.Hour) })[0]
	require.Empty(t, stampede(t, ms, 400, failoverBatch, 10*time.Second))
	return ms, idle, acquireID(t, idle, "user0", "proj0")
}

// removalReachesEveryInstance removes (user0, proj0), served removed, on
// ms[0], and checks that the other instances and idle stop handing it out
// at once, not at their next probe (an hour away).
func removalReachesEveryInstance(t *testing.T, ms []*sandboxpool.Manager, idle *sandboxpool.Manager, removed string) {
	t.Helper()
	require.Equal(t, removed, servedID(ms[1], "user0", "proj0"))
	require.NoError(t, ms[0].Remove(context.Background(), "user0", "proj0"))
	assert.Eventually(t, func() bool {
		for _, m := range append(ms[1:], idle) {
			if id := servedID(m, "user0", "proj0"); id == "" || id == removed {
				return false
			}
		}
		return true
	}, 5*time.Second, 10*time.Millisecond, "every instance forgets the removed sandbox at once, not at its next probe")
}

// throughFailover checks that ms carry a failover of their Redis (see
// carried), which fail starts and wait sees complete, and that it met
// them (Redis errors); it returns the pairs there are now.
func throughFailover(t *testing.T, ms []*sandboxpool.Manager, p *fp.Provider, pairs int, name string, fail, wait func()) int {
	t.Helper()
	pairs, redisErrors := carried(t, ms, p, pairs, "failover of "+name, fail, wait)
	assert.Positive(t, redisErrors, "the failover met the instances")
	return pairs
}

// acquireWait is how long carried's callers wait for an Acquire.
const acquireWait = 15 * time.Second

// carried checks that ms carry a change of their Redis, which change
// starts and wait sees complete: it runs load on them, over pairs pairs
// until change is called, then over failoverBatch new ones too. No
// Acquire may fail within its deadline (acquireWait); every breaker closes; within
// 15 s every pair is served one sandbox, the same by every instance
// (duplicates made without the lock are retired once published), and no
// other runs. It returns the pairs there are now, and the Redis errors
// the instances counted meanwhile.
func carried(t *testing.T, ms []*sandboxpool.Manager, p *fp.Provider, pairs int, name string, change, wait func()) (int, int64) {
	t.Helper()
	var changed atomic.Bool
	stop := load(t, ms, acquireWait, func(w, i int) int {
		if changed.Load() && i%2 == 0 {
			return pairs + (w*11+i)%failoverBatch
		}
		return (w*11 + i) % pairs
	})
	time.Sleep(200 * time.Millisecond)
	before := sumStats(ms)
	start := time.Now()
	change()
	changed.Store(true)
	wait()
	took := time.Since(start)
	time.Sleep(500 * time.Millisecond)
	served, failed := stop()
	pairs += failoverBatch
	st := sumStats(ms)
	t.Logf("%s took %s: %d served, %d failed, %d Redis errors, %d creates without the lock, %d creates for %d pairs",
		name, took.Round(time.Millisecond), served, failed, st.RedisErrors-before.RedisErrors,
		st.DegradedCreates-before.DegradedCreates, p.Calls(fp.OpCreate), pairs)
	assert.Zero(t, failed, "every Acquire is served within its deadline")
	waitBreakersClosed(t, ms, "every breaker closes")
	require.Eventually(t, func() bool {
		for pair := range pairs {
			user, project := fmt.Sprint("user", pair%10), fmt.Sprint("proj", pair)
			id := servedID(ms[0], user, project)
			for _, m := range ms[1:] {
				if id == "" || servedID(m, user, project) != id {
					return false
				}
			}
		}
		return true
	}, 15*time.Second, 50*time.Millisecond, "every instance serves each pair's one sandbox")
	assert.Eventually(t, func() bool { return len(p.Alive()) == pairs }, 10*time.Second, 20*time.Millisecond, "one sandbox per pair alive")
	return pairs, st.RedisErrors - before.RedisErrors
}

// load runs 8 workers that Acquire and Release, 2 ms apart, the pair
// pick(w, i) names for worker w's i-th request, on Manager (w+i)%len(ms),
// each within timeout, until the stop it returns is called: stop waits for
// them and reports how many Acquires were served and how many failed
// (each logged).
func load(t *testing.T, ms []*sandboxpool.Manager, timeout time.Duration, pick func(w, i int) int) (stop func() (served, failed int64)) {
	var (
		servedN, failedN atomic.Int64
		wg               sync.WaitGroup
	)
	done := make(chan struct{})
	for w := range 8 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-done:
					return
				default:
				}
				pair := pick(w, i)
				ctx, cancel := context.WithTimeout(context.Background(), timeout)
				l, err := ms[(w+i)%len(ms)].Acquire(ctx, fmt.Sprint("user", pair%10), fmt.Sprint("proj", pair))
				cancel()
				if err != nil {
					failedN.Add(1)
					t.Logf("acquire failed: %v", err)
					continue
				}
				servedN.Add(1)
				l.Release()
				time.Sleep(2 * time.Millisecond)
			}
		})
	}
	return func() (int64, int64) {
		close(done)
		wg.Wait()
		return servedN.Load(), failedN.Load()
	}
}

// waitBreakersClosed waits until no Manager of ms holds Redis degraded.
func waitBreakersClosed(t *testing.T, ms []*sandboxpool.Manager, msg string) {
	t.Helper()
	require.Eventually(t, func() bool {
		for _, m := range ms {
			if m.Stats().RedisDegraded {
				return false
			}
		}
		return true
	}, 15*time.Second, 20*time.Millisecond, msg)
}

// waitGoroutinesGone waits up to d until no goroutine runs fn.
func waitGoroutinesGone(t *testing.T, fn string, d time.Duration) {
	t.Helper()
	assert.Eventually(t, func() bool {
		for _, g := range sandboxpool.GoroutineStacks() {
			if strings.Contains(g, fn) {
				return false
			}
		}
		return true
	}, d, 20*time.Millisecond, "a goroutine still runs %s", fn)
}

// Removals still reach every instance after Redis restarts: the removal
// subscriber notices the lost connection and subscribes again, on its own
// deadlines, within moments of Redis coming back.
func TestRealRedisRemovalsReachOtherInstancesAfterARestart(t *testing.T) {
	srv := redistest.Start(t)
	p := fp.New()
	ms := instances(t, 2, p, outageClient(t, srv.Addr))
	id := acquireID(t, ms[0], "u", "p")
	require.Equal(t, id, acquireID(t, ms[1], "u", "p"))

	srv.Stop()
	srv.Start()
	admin := srv.Client(t)
	require.Eventually(t, func() bool {
		n, err := admin.PubSubNumSub(context.Background(), "sandboxpool:removed").Result()
		return err == nil && n["sandboxpool:removed"] == 2
	}, 10*time.Second, 10*time.Millisecond, "both instances subscribe again")

	require.NoError(t, ms[0].Remove(context.Background(), "u", "p"))
	require.Eventually(t, func() bool { return ms[1].Stats().Active == 0 }, 5*time.Second, 5*time.Millisecond,
		"the other instance forgets the removed sandbox at once, not at its next probe")
	assert.NotEqual(t, id, acquireID(t, ms[1], "u", "p"))
}

// waitSubscribed waits until n clients listen for removals on srv (a
// Cluster's node counts only its own subscribers: a Cluster client
// subscribes on the master of the channel's slot).
func waitSubscribed(t *testing.T, srv *redistest.Server, n int64) {
	t.Helper()
	admin := srv.Client(t)
	require.Eventually(t, func() bool {
		got, err := admin.PubSubNumSub(context.Background(), "sandboxpool:removed").Result()
		return err == nil && got["sandboxpool:removed"] == n
	}, 15*time.Second, 10*time.Millisecond, "%d instances subscribed on %s", n, srv.Addr)
}

// servedID is the sandbox m hands out for the pair, or "" if Acquire fails.
func servedID(m *sandboxpool.Manager, user, project string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	l, err := m.Acquire(ctx, user, project)
	if err != nil {
		return ""
	}
	defer l.Release()
	return l.Sandbox().ID
}

// cutEnv is two instances on one redis-server: direct, and cut, whose
// Redis traffic goes through link. Probes are an hour apart, so that only
// announcements, and what makes up for missed ones, tell an instance a
// sandbox is gone. Both hold the sandbox id of the pair ("u", "p").
type cutEnv struct {
	srv         *redistest.Server
	link        *redistest.Link
	p           *fp.Provider
	direct, cut *sandboxpool.Manager
	id          string
}

func newCutEnv(t *testing.T) *cutEnv {
	e := &cutEnv{srv: redistest.Start(t), p: fp.New()}
	e.link = redistest.StartLink(t, e.srv.Addr, 0)
	hourlyProbes := func(c *sandboxpool.Config) { c.HealthCheckAfter = time.Hour }
	e.direct = instances(t, 1, e.p, func() redis.UniversalClient { return e.srv.Client(t) }, hourlyProbes)[0]
	e.cut = instances(t, 1, e.p, pooledClient(t, e.link.Addr, 0), hourlyProbes)[0]
	waitSubscribed(t, e.srv, 2)
	e.id = acquireID(t, e.direct, "u", "p")
	require.Equal(t, e.id, acquireID(t, e.cut, "u", "p"))
	return e
}

// An instance whose connections to Redis die without a word (Link.Cut: a
// partition TCP gave up on, a NAT or load balancer that dropped its flows,
// a Redis host gone without a reset) misses the announcement of a Remove
// made meanwhile on another instance. Once it reaches Redis again it stops
// handing the removed sandbox out without waiting for its next probe (an
// hour away here): its subscriber finds the dead connection by a ping that
// gets no answer, subscribes anew, and rechecks what Redis no longer names
// (a pair nobody removed is not probed). Before, the ping's write succeeded
// into the dead connection, nothing noticed the silence, and the sandbox
// was handed out until HealthCheckAfter.
func TestRealRedisRemovalMissedOnADeadConnectionIsMadeUp(t *testing.T) {
	e := newCutEnv(t)
	direct, cut, p, id := e.direct, e.cut, e.p, e.id
	kept := acquireID(t, direct, "u", "q") // a pair nobody removes
	require.Equal(t, kept, acquireID(t, cut, "u", "q"))

	e.link.Cut()
	require.NoError(t, direct.Remove(context.Background(), "u", "p"))
	require.NotContains(t, p.Alive(), id)
	require.Equal(t, id, acquireID(t, cut, "u", "p"), "cut off, it heard nothing and still hands the sandbox out from memory")
	e.link.Heal()

	require.Eventually(t, func() bool {
		got := servedID(cut, "u", "p")
		return got != "" && got != id
	}, 15*time.Second, 20*time.Millisecond, "the removed sandbox is still handed out after the link healed")
	assert.NotContains(t, p.Alive(), id)
	assert.Positive(t, cut.Stats().Resubscribed, "the cut instance subscribed again")
	assert.Zero(t, direct.Stats().Resubscribed, "the other instance kept its subscription")
	// Only what Redis no longer names was rechecked: the pair nobody
	// removed is still a memory hit, with no probe.
	probes := cut.Stats().HealthChecks
	assert.Equal(t, kept, acquireID(t, cut, "u", "q"))
	assert.Equal(t, probes, cut.Stats().HealthChecks, "a sandbox Redis still names was probed")
	require.Eventually(t, func() bool { return servedID(direct, "u", "p") == servedID(cut, "u", "p") }, 15*time.Second, 20*time.Millisecond,
		"the instances agree on the pair's new sandbox")
	assert.ElementsMatch(t, []string{kept, servedID(direct, "u", "p")}, p.Alive(), "one sandbox per pair")
}

// A Remove on an instance cut off from Redis kills the pair's sandbox but
// can neither delete its record nor announce it: it fails with
// ErrUnavailable, and keeps the removal. Once Redis answers that instance
// again, the record is deleted and the removal announced, and the other
// instance forgets the sandbox at once, with no Acquire and no probe (an
// hour away here). Before, the record stayed until its expiry, and the
// other instance handed the sandbox out until its next probe.
func TestRealRedisRemovalCutOffFromRedisIsMadeOnRecovery(t *testing.T) {
	e := newCutEnv(t)
	other, cut, p, id := e.direct, e.cut, e.p, e.id
	admin := e.srv.Client(t)
	record := func() string { return admin.HGet(context.Background(), "sandboxpool:{u:p}:sbx", "id").Val() }

	e.link.Cut()
	require.ErrorIs(t, cut.Remove(context.Background(), "u", "p"), sandboxpool.ErrUnavailable)
	require.NotContains(t, p.Alive(), id, "killed all the same")
	require.Equal(t, id, record(), "cut off, it could not delete the record")
	require.EqualValues(t, 1, cut.Stats().UnannouncedRemovals)
	require.Equal(t, id, acquireID(t, other, "u", "p"), "not told, the other instance still hands the sandbox out")
	e.link.Heal()

	require.Eventually(t, func() bool { return other.Stats().Active == 0 }, 10*time.Second, 10*time.Millisecond,
		"the other instance was not told of the removal once Redis answered again")
	assert.Empty(t, record(), "the record outlived the removal")
	// The announcement may reach the other instance before the cut one
	// counts its removal made, a moment after it sends it.
	assert.Eventually(t, func() bool { return cut.Stats().UnannouncedRemovals == 0 }, time.Second, time.Millisecond)
	assert.NotEqual(t, id, acquireID(t, other, "u", "p"))
}
