package sandboxpool_test

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sandboxpool/sandboxpool"
	fp "github.com/sandboxpool/sandboxpool/internal/fakeprovider"
)

// cluster is several Managers (instances) sharing one Redis and provider.
type cluster struct {
	mr    *miniredis.Miniredis // nil on a real redis-server
	p     *fp.Provider
	clock *fakeClock
	base  sandboxpool.Config
}

func newMiniCluster(t *testing.T, mutate ...func(*sandboxpool.Config)) *cluster {
	t.Helper()
	mr := miniredis.RunT(t)
	clk := newFakeClock()
	mr.SetTime(clk.Now())
	p := fp.New()
	p.Now = clk.Now
	cfg := sandboxpool.Config{Provider: p, ReapInterval: time.Hour, IdleTimeout: 5 * time.Minute, MaxAge: 15 * time.Minute}
	sandboxpool.SetClock(&cfg, clk.Now)
	sandboxpool.FastRedisRecovery(&cfg, 20*time.Millisecond)
	for _, f := range mutate {
		f(&cfg)
	}
	return &cluster{mr: mr, p: p, clock: clk, base: cfg}
}

// instance builds a Manager with its own Redis client, as another process would.
func (c *cluster) instance(t *testing.T, mutate ...func(*sandboxpool.Config)) *sandboxpool.Manager {
	t.Helper()
	cfg := c.base
	if cfg.Redis == nil {
		rdb := redis.NewClient(&redis.Options{Addr: c.mr.Addr(), MaxRetries: -1})
		t.Cleanup(func() { _ = rdb.Close() })
		cfg.Redis = rdb
	}
	for _, f := range mutate {
		f(&cfg)
	}
	m, err := sandboxpool.New(cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = m.Close(context.Background()) })
	return m
}

func (c *cluster) advance(d time.Duration) {
	c.clock.Advance(d)
	if c.mr != nil {
		c.mr.FastForward(d)
		c.mr.SetTime(c.clock.Now())
	}
}

func TestRedisKeyLayoutAndAlignedTTL(t *testing.T) {
	c := newMiniCluster(t)
	m := c.instance(t)
	id := acquireID(t, m, "alice", "p1")
	key := "sandboxpool:{alice:p1}:sbx"
	assert.Equal(t, []string{key}, c.mr.Keys())
	assert.Equal(t, id, c.mr.HGet(key, "id"))
	assert.Equal(t, "base", c.mr.HGet(key, "tpl"))
	assert.Equal(t, 5*time.Minute, c.mr.TTL(key), "the key expires with the sandbox")
	dl, _ := c.p.Deadline(id)
	assert.Equal(t, strconv.FormatInt(dl.UnixMilli(), 10), c.mr.HGet(key, "deadline"), "Redis and provider deadlines agree")

	c.advance(5 * time.Minute)
	assert.Empty(t, c.mr.Keys(), "no key outlives its sandbox")
	_, alive := c.p.Deadline(id)
	assert.False(t, alive)
}

// A new process on the same Redis reconnects to the pair's sandbox (via
// Redis, not by listing) and creates nothing.
func TestRedisRestartReconnects(t *testing.T) {
	c := newMiniCluster(t)
	m1 := c.instance(t)
	id := acquireID(t, m1, "u", "p")
	require.NoError(t, m1.Close(context.Background()))
	m2 := c.instance(t)
	assert.Equal(t, id, acquireID(t, m2, "u", "p"))
	assert.EqualValues(t, 1, c.p.Calls(fp.OpCreate))
	assert.EqualValues(t, 1, c.p.Calls(fp.OpList), "the cache hit needs no listing")
	st := m2.Stats()
	assert.EqualValues(t, 1, st.CacheHits)
	assert.EqualValues(t, 1, st.Reconnects)
	assert.EqualValues(t, 0, st.Creates)
}

func TestRedisNamespacesIsolate(t *testing.T) {
	c := newMiniCluster(t)
	a := c.instance(t, func(cfg *sandboxpool.Config) { cfg.Namespace = "team-a" })
	b := c.instance(t, func(cfg *sandboxpool.Config) { cfg.Namespace = "team-b" })
	ida, idb := acquireID(t, a, "u", "p"), acquireID(t, b, "u", "p")
	assert.NotEqual(t, ida, idb)
	assert.ElementsMatch(t, []string{"team-a:{u:p}:sbx", "team-b:{u:p}:sbx"}, c.mr.Keys())
	require.NoError(t, a.Remove(context.Background(), "u", "p"))
	assert.Equal(t, []string{"team-b:{u:p}:sbx"}, c.mr.Keys())
	assert.Equal(t, idb, acquireID(t, b, "u", "p"))
}

// A creator whose lock expired (stalled past LockTTL) cannot publish: it
// kills its own sandbox and adopts the winner's.
func TestRedisStalledLockHolderCannotPublish(t *testing.T) {
	c := newMiniCluster(t)
	m := c.instance(t)
	// The winner another instance will publish (created up front, under
	// other metadata so that our listing cannot adopt it early).
	winner, err := c.p.Create(context.Background(), sandboxpool.CreateRequest{Template: "base", Timeout: 5 * time.Minute})
	require.NoError(t, err)
	c.p.SetLatency(fp.OpCreate, 300*time.Millisecond)
	type result struct {
		id  string
		err error
	}
	done := make(chan result, 1)
	go func() {
		l, err := m.Acquire(context.Background(), "u", "p")
		if err != nil {
			done <- result{err: err}
			return
		}
		defer l.Release()
		done <- result{id: l.Sandbox().ID}
	}()
	// Once our create is under way, our lock "expires": another instance
	// takes it and publishes its sandbox.
	require.Eventually(t, func() bool { return c.p.Calls(fp.OpCreate) == 2 }, 5*time.Second, time.Millisecond)
	lockKey, key := "sandboxpool:{u:p}:lock", "sandboxpool:{u:p}:sbx"
	require.True(t, c.mr.Exists(lockKey))
	c.mr.Del(lockKey)
	require.NoError(t, c.mr.Set(lockKey, "someone-else"))
	now := c.clock.Now()
	c.mr.HSet(key, "id", winner.ID, "tpl", "base", "created", strconv.FormatInt(now.UnixMilli(), 10), "deadline", strconv.FormatInt(now.Add(5*time.Minute).UnixMilli(), 10))
	c.mr.SetTTL(key, 5*time.Minute)

	r := <-done
	require.NoError(t, r.err)
	assert.Equal(t, winner.ID, r.id, "adopted the winner's sandbox")
	assert.Equal(t, []string{winner.ID}, c.p.Alive(), "its own sandbox was killed")
	assert.Equal(t, winner.ID, c.mr.HGet(key, "id"), "never overwrote the winner")
	assert.EqualValues(t, 1, m.Stats().LockLost)
}

// The idle clock lives in Redis: an instance whose copy is idle does not
// kill a sandbox another instance keeps using.
func TestRedisIdleClockSharedAcrossInstances(t *testing.T) {
	c := newMiniCluster(t)
	a, b := c.instance(t), c.instance(t)
	id := acquireID(t, a, "u", "p")
	require.Equal(t, id, acquireID(t, b, "u", "p"))
	for range 4 { // b uses it every 2 min; a never does
		c.advance(2 * time.Minute)
		require.Equal(t, id, acquireID(t, b, "u", "p"))
		b.ReapNow()
		a.ReapNow()
		_, alive := c.p.Deadline(id)
		require.True(t, alive, "a must not kill what b is using")
	}
	assert.EqualValues(t, 0, a.Stats().Evictions+b.Stats().Evictions)
	assert.EqualValues(t, 1, a.Stats().Active, "a learned the later deadline and kept its entry")

	// Now nobody uses it: both reap, the key goes, the sandbox dies.
	c.advance(6 * time.Minute)
	a.ReapNow()
	b.ReapNow()
	assert.Eventually(t, func() bool { return len(c.p.Alive()) == 0 }, 5*time.Second, time.Millisecond)
	assert.Empty(t, c.mr.Keys())
}

// Compare-and-delete: a stale remover never deletes a newer sandbox's key.
func TestRedisCompareAndDelete(t *testing.T) {
	c := newMiniCluster(t)
	a, b := c.instance(t), c.instance(t)
	old := acquireID(t, a, "u", "p")
	c.p.Vanish(old)
	c.advance(time.Minute)
	newer := acquireID(t, b, "u", "p") // b replaces it in Redis
	require.NotEqual(t, old, newer)
	// a still holds the old one and evicts it when idle.
	c.advance(4*time.Minute + 30*time.Second)
	a.ReapNow()
	require.Eventually(t, func() bool { return a.Stats().Active == 0 }, 5*time.Second, time.Millisecond)
	assert.Equal(t, newer, c.mr.HGet("sandboxpool:{u:p}:sbx", "id"))
}

func TestRedisDownDegradesAndRecovers(t *testing.T) {
	c := newMiniCluster(t)
	m := c.instance(t)
	hot := acquireID(t, m, "u", "hot")
	c.mr.SetError("LOADING Redis is loading the dataset in memory")
	assert.Equal(t, hot, acquireID(t, m, "u", "hot"), "memory hits need no Redis")
	cold := acquireID(t, m, "u", "cold") // created without the lock
	st := m.Stats()
	assert.EqualValues(t, 1, st.DegradedCreates)
	assert.Positive(t, st.RedisErrors)
	for range 3 {
		acquireID(t, m, "u", fmt.Sprint("more", st.RedisErrors))
	}
	assert.True(t, m.Stats().RedisDegraded, "the breaker opened")

	c.mr.SetError("")
	require.Eventually(t, func() bool { return !m.Stats().RedisDegraded }, 5*time.Second, 5*time.Millisecond, "the probe closes the breaker with no traffic")
	require.Eventually(t, func() bool { return c.mr.HGet("sandboxpool:{u:cold}:sbx", "id") == cold }, 5*time.Second, 5*time.Millisecond,
		"the outage's sandbox is published on recovery")
}

func TestRedisDownRefusesCreatesWhenConfigured(t *testing.T) {
	c := newMiniCluster(t, func(cfg *sandboxpool.Config) { cfg.RefuseCreatesWhenDegraded = true })
	m := c.instance(t)
	hot := acquireID(t, m, "u", "hot")
	c.mr.SetError("ERR down")
	_, err := m.Acquire(context.Background(), "u", "cold")
	require.ErrorIs(t, err, sandboxpool.ErrUnavailable)
	assert.Equal(t, hot, acquireID(t, m, "u", "hot"))
	assert.EqualValues(t, 1, c.p.Calls(fp.OpCreate))
}

func TestRedisQuotasAcrossInstances(t *testing.T) {
	c := newMiniCluster(t, func(cfg *sandboxpool.Config) { cfg.MaxSandboxes = 10; cfg.MaxPerUser = 3 })
	ms := []*sandboxpool.Manager{c.instance(t), c.instance(t), c.instance(t), c.instance(t)}
	var mu sync.Mutex
	created, refused := map[string]int{}, 0
	var wg sync.WaitGroup
	for u := range 6 {
		for p := range 5 {
			wg.Go(func() {
				m := ms[(u+p)%len(ms)]
				l, err := m.Acquire(context.Background(), fmt.Sprint("user", u), fmt.Sprint("p", p))
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					assert.ErrorIs(t, err, sandboxpool.ErrQuotaExceeded)
					refused++
					return
				}
				created[fmt.Sprint("user", u)]++
				l.Release()
			})
		}
	}
	wg.Wait()
	total := 0
	for u, n := range created {
		assert.LessOrEqual(t, n, 3, u)
		total += n
	}
	assert.Equal(t, 10, total, "exactly MaxSandboxes across instances")
	assert.Equal(t, 20, refused)
	assert.Len(t, c.p.Alive(), 10)
}

func TestRedisCreateRateLimitAcrossInstances(t *testing.T) {
	c := newMiniCluster(t, func(cfg *sandboxpool.Config) {
		cfg.CreateLimit = sandboxpool.RateLimit{Rate: 2, Burst: 2, Per: time.Hour}
	})
	a, b := c.instance(t), c.instance(t)
	acquireID(t, a, "u", "1")
	acquireID(t, b, "u", "2")
	_, err := a.Acquire(context.Background(), "u", "3")
	require.ErrorIs(t, err, sandboxpool.ErrRateLimited)
	ra, ok := sandboxpool.RetryAfter(err)
	require.True(t, ok)
	assert.Positive(t, ra)
	_, err = b.Acquire(context.Background(), "u", "4")
	require.ErrorIs(t, err, sandboxpool.ErrRateLimited)
	acquireID(t, b, "u", "1") // reuse is never limited
	acquireID(t, a, "v", "1") // other users are not limited
	assert.EqualValues(t, 3, c.p.Calls(fp.OpCreate))
}

// After every pair is reaped no key is left behind, quota sets included.
func TestRedisNoStaleKeysAfterReaping(t *testing.T) {
	c := newMiniCluster(t, func(cfg *sandboxpool.Config) { cfg.MaxSandboxes = 100; cfg.MaxPerUser = 10 })
	m := c.instance(t)
	for i := range 20 {
		acquireID(t, m, fmt.Sprint("u", i%4), fmt.Sprint("p", i))
	}
	assert.Len(t, c.mr.Keys(), 20+1+4, "records, the global set, the user sets")
	c.advance(6 * time.Minute)
	m.ReapNow()
	require.Eventually(t, func() bool { return len(c.p.Alive()) == 0 && len(c.mr.Keys()) == 0 }, 5*time.Second, 5*time.Millisecond,
		"left: %v", c.mr.Keys())
}
