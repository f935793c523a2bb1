package sandboxpool_test

import (
	"context"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sandboxpool/sandboxpool"
	"github.com/sandboxpool/sandboxpool/internal/fakeprovider"
)

func TestNewValidatesConfig(t *testing.T) {
	p := fakeprovider.New()
	cases := []struct {
		name string
		cfg  sandboxpool.Config
		want string
	}{
		{"nil provider", sandboxpool.Config{}, "Provider is required"},
		{"negative idle", sandboxpool.Config{Provider: p, IdleTimeout: -time.Second}, "IdleTimeout must not be negative"},
		{"negative reap", sandboxpool.Config{Provider: p, ReapInterval: -1}, "ReapInterval must not be negative"},
		{"max age below idle", sandboxpool.Config{Provider: p, IdleTimeout: 10 * time.Minute, MaxAge: time.Minute}, "MaxAge (1m0s) must be >= IdleTimeout (10m0s)"},
		{"sub-millisecond lock", sandboxpool.Config{Provider: p, LockTTL: 500 * time.Microsecond}, "LockTTL must be at least 1ms"},
		{"sub-second idle", sandboxpool.Config{Provider: p, IdleTimeout: time.Millisecond, MaxAge: time.Minute}, "at least 1s"},
		{"bad namespace", sandboxpool.Config{Provider: p, Namespace: "a:b"}, "Namespace: invalid namespace"},
		{"namespace glob", sandboxpool.Config{Provider: p, Namespace: "ns*"}, "Namespace"},
		{"negative quota", sandboxpool.Config{Provider: p, MaxPerUser: -1}, "must not be negative"},
		{"per user above total", sandboxpool.Config{Provider: p, MaxSandboxes: 1, MaxPerUser: 2}, "MaxPerUser (2) must not exceed"},
		{"negative rate", sandboxpool.Config{Provider: p, CreateLimit: sandboxpool.RateLimit{Rate: -1}}, "CreateLimit"},
		{"too many shards", sandboxpool.Config{Provider: p, Shards: 1 << 20}, "Shards"},
		{"reserved metadata", sandboxpool.Config{Provider: p, Metadata: map[string]string{"sandboxpool.user": "x"}}, "reserved prefix"},
		{"probe below -1", sandboxpool.Config{Provider: p, HealthCheckAfter: -2}, "HealthCheckAfter"},
		{"burst spanning centuries", sandboxpool.Config{Provider: p, CreateLimit: sandboxpool.RateLimit{Rate: 1, Burst: 1000, Per: 365 * 24 * time.Hour}},
			"a burst of 1000 at 1 per 8760h0m0s spans more than MaxDuration"},
		{"reap slower than IdleTimeout/8", sandboxpool.Config{Provider: p, IdleTimeout: time.Minute, ReapInterval: 30 * time.Second},
			"ReapInterval (30s) must be at most IdleTimeout/8 (7.5s)"},
		{"default reap with a short IdleTimeout set slower", sandboxpool.Config{Provider: p, IdleTimeout: 4 * time.Second, ReapInterval: time.Second},
			"ReapInterval (1s) must be at most IdleTimeout/8 (500ms)"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m, err := sandboxpool.New(tc.cfg)
			require.Error(t, err)
			assert.Nil(t, m)
			assert.Contains(t, err.Error(), tc.want)
			assert.True(t, strings.HasPrefix(err.Error(), "sandboxpool: invalid config"))
		})
	}
}

// The default tick follows a short IdleTimeout down, so a Config that sets
// only IdleTimeout is always valid.
func TestDefaultReapIntervalFollowsIdleTimeout(t *testing.T) {
	for idle, want := range map[time.Duration]time.Duration{
		0:               sandboxpool.DefaultReapInterval,
		time.Minute:     sandboxpool.DefaultReapInterval,
		8 * time.Second: time.Second,
		4 * time.Second: 500 * time.Millisecond,
		time.Second:     125 * time.Millisecond,
		math.MaxInt64:   sandboxpool.DefaultReapInterval,
	} {
		m, err := sandboxpool.New(sandboxpool.Config{Provider: fakeprovider.New(), IdleTimeout: idle, MaxAge: math.MaxInt64})
		require.NoError(t, err, idle)
		assert.Equal(t, want, sandboxpool.ReapInterval(m), idle)
		require.NoError(t, m.Close(context.Background()))
	}
}

func TestNewReportsEveryProblem(t *testing.T) {
	_, err := sandboxpool.New(sandboxpool.Config{IdleTimeout: -1, Namespace: "{x}"})
	require.Error(t, err)
	for _, want := range []string{"Provider", "IdleTimeout", "Namespace"} {
		assert.Contains(t, err.Error(), want)
	}
}

func TestConfigFromEnv(t *testing.T) {
	cfg, err := sandboxpool.ConfigFrom(map[string]string{
		"SANDBOXPOOL_NAMESPACE":                    "prod",
		"SANDBOXPOOL_IDLE_TIMEOUT":                 "90s",
		"SANDBOXPOOL_MAX_AGE":                      "1h",
		"SANDBOXPOOL_MAX_PER_USER":                 "3",
		"SANDBOXPOOL_CREATE_RATE":                  "10",
		"SANDBOXPOOL_CREATE_PER":                   "1m",
		"SANDBOXPOOL_REFUSE_CREATES_WHEN_DEGRADED": "true",
	})
	require.NoError(t, err)
	assert.Equal(t, "prod", cfg.Namespace)
	assert.Equal(t, 90*time.Second, cfg.IdleTimeout)
	assert.Equal(t, time.Hour, cfg.MaxAge)
	assert.Equal(t, 3, cfg.MaxPerUser)
	assert.Equal(t, sandboxpool.RateLimit{Rate: 10, Per: time.Minute}, cfg.CreateLimit)
	assert.True(t, cfg.RefuseCreatesWhenDegraded)

	empty, err := sandboxpool.ConfigFrom(nil)
	require.NoError(t, err)
	assert.Zero(t, empty.IdleTimeout, "unset variables keep the defaults")
}

func TestConfigFromEnvErrors(t *testing.T) {
	for name, val := range map[string]string{
		"SANDBOXPOOL_IDLE_TIMEOUT":                 "5 minutes",
		"SANDBOXPOOL_MAX_AGE":                      "forever",
		"SANDBOXPOOL_MAX_SANDBOXES":                "-3",
		"SANDBOXPOOL_MAX_PER_USER":                 "many",
		"SANDBOXPOOL_CREATE_RATE":                  "1.5",
		"SANDBOXPOOL_REFUSE_CREATES_WHEN_DEGRADED": "maybe",
	} {
		t.Run(name, func(t *testing.T) {
			_, err := sandboxpool.ConfigFrom(map[string]string{name: val})
			require.Error(t, err)
			assert.Contains(t, err.Error(), name)
			assert.Contains(t, err.Error(), val)
		})
	}
	_, err := sandboxpool.ConfigFrom(map[string]string{"SANDBOXPOOL_MAX_AGE": "x", "SANDBOXPOOL_LOCK_TTL": "y"})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "SANDBOXPOOL_MAX_AGE")
	assert.Contains(t, err.Error(), "SANDBOXPOOL_LOCK_TTL")
}

func TestConfigFromEnvRedisURL(t *testing.T) {
	cfg, err := sandboxpool.ConfigFrom(map[string]string{"REDIS_URL": "redis://:s3cret@127.0.0.1:6399/2"})
	require.NoError(t, err)
	require.NotNil(t, cfg.Redis)
	_ = cfg.Redis.Close()
	_, err = sandboxpool.ConfigFrom(map[string]string{"REDIS_URL": "http://:s3cret@host"})
	require.ErrorContains(t, err, "REDIS_URL")
	assert.NotContains(t, err.Error(), "s3cret")
}

// go-redis applies a context's deadline to its socket only when built with
// ContextTimeoutEnabled; without it RedisTimeout would bound nothing on a
// stalled server, so New refuses such a client, of each go-redis type, and
// takes a client of another type (a wrapper) at its word.
func TestNewRefusesRedisClientsThatIgnoreContextDeadlines(t *testing.T) {
	p := fakeprovider.New()
	for _, c := range []struct {
		name string
		rdb  redis.UniversalClient
		ok   bool
	}{
		{"client", redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"}), false},
		{"client, ContextTimeoutEnabled", redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", ContextTimeoutEnabled: true}), true},
		{"failover client", redis.NewFailoverClient(&redis.FailoverOptions{MasterName: "m", SentinelAddrs: []string{"127.0.0.1:1"}}), false},
		{"cluster client", redis.NewClusterClient(&redis.ClusterOptions{Addrs: []string{"127.0.0.1:1"}}), false},
		{"cluster client, ContextTimeoutEnabled", redis.NewClusterClient(&redis.ClusterOptions{Addrs: []string{"127.0.0.1:1"}, ContextTimeoutEnabled: true}), true},
		{"ring", redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": "127.0.0.1:1"}}), false},
		{"wrapper", wrappedClient{redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})}, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			defer c.rdb.Close()
			m, err := sandboxpool.New(sandboxpool.Config{Provider: p, Redis: c.rdb})
			if c.ok {
				require.NoError(t, err)
				require.NoError(t, m.Close(context.Background()))
				return
			}
			require.Error(t, err)
			assert.Contains(t, err.Error(), "ContextTimeoutEnabled: true")
		})
	}
}

// wrappedClient is a UniversalClient that is not one of go-redis's types.
type wrappedClient struct{ redis.UniversalClient }
