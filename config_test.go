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
		{"condemnation below -1", sandboxpool.Config{Provider: p, UnresponsiveAfter: -2}, "UnresponsiveAfter must be -1 (never condemn)"},
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
		assert.Equal(t, want, sandboxpool.EffectiveConfig(m).ReapInterval, idle)
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
		"SANDBOXPOOL_UNRESPONSIVE_AFTER":           "-1ns",
	})
	require.NoError(t, err)
	assert.Equal(t, "prod", cfg.Namespace)
	assert.Equal(t, 90*time.Second, cfg.IdleTimeout)
	assert.Equal(t, time.Hour, cfg.MaxAge)
	assert.Equal(t, 3, cfg.MaxPerUser)
	assert.Equal(t, sandboxpool.RateLimit{Rate: 10, Per: time.Minute}, cfg.CreateLimit)
	assert.True(t, cfg.RefuseCreatesWhenDegraded)
	assert.Equal(t, time.Duration(-1), cfg.UnresponsiveAfter)

	empty, err := sandboxpool.ConfigFrom(nil)
	require.NoError(t, err)
	assert.Zero(t, empty.IdleTimeout, "unset variables keep the defaults")
}

// ConfigFromEnv reads the process's environment: a variable set there
// reaches the Config, and a malformed one is an error naming it.
func TestConfigFromEnvReadsTheProcessEnvironment(t *testing.T) {
	t.Setenv(sandboxpool.EnvE2BAPIKey, "") // empty: no provider, whatever the machine has set
	t.Setenv(sandboxpool.EnvRedisURL, "")
	t.Setenv(sandboxpool.EnvNamespace, "staging")
	t.Setenv(sandboxpool.EnvMaxAge, "2h")
	cfg, err := sandboxpool.ConfigFromEnv()
	require.NoError(t, err)
	assert.Equal(t, "staging", cfg.Namespace)
	assert.Equal(t, 2*time.Hour, cfg.MaxAge)
	assert.Nil(t, cfg.Provider)
	assert.Nil(t, cfg.Redis)

	t.Setenv(sandboxpool.EnvLockTTL, "soon")
	_, err = sandboxpool.ConfigFromEnv()
	require.ErrorContains(t, err, sandboxpool.EnvLockTTL)
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

// FuzzConfigFromEnv: whatever an operator writes in the SANDBOXPOOL_*
// variables, ConfigFromEnv and New never panic; a malformed value is an
// error naming its variable; and a Manager that New accepts runs with a
// config whose timings hold together (the bounds the reaper and the
// provider's whole seconds rely on), and serves a pair.
func FuzzConfigFromEnv(f *testing.F) {
	for _, s := range [][9]string{
		{"", "", "", "", "", "", "", "", ""},
		{"90s", "1h", "10s", "30s", "10", "", "1m", "10s", "2m"},
		{"1s", "1s", "125ms", "-1ns", "1", "1", "1ns", "1ms", "1ns"},
		{"2562047h", "2562047h47m16.854775807s", "", "", "1", "9223372036854775807", "2562047h", "2562047h", "2562047h47m16.854775807s"},
		{"-1s", "0", "1ns", "-2ns", "-1", "x", "-1m", "999us", "-2ns"},
		{"1s", "", "", "", "1000000000", "", "1ns", "", "-1ns"},
		{"1s", "1s", "1ns", "-1ns", "1", "1", "1ns", "1ms", "0"},
		{"2562047h", "2562047h", "", "", "", "", "", "2562047h", ""},
		{"5 minutes", "forever", "1e3s", "NaN", "1.5", "0x10", "1d", "∞", "never"},
	} {
		f.Add(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8])
	}
	f.Fuzz(func(t *testing.T, idle, maxAge, reap, health, rate, burst, per, lockTTL, unresponsive string) {
		env := map[string]string{
			sandboxpool.EnvIdleTimeout: idle, sandboxpool.EnvMaxAge: maxAge, sandboxpool.EnvReapInterval: reap,
			sandboxpool.EnvHealthCheckAfter: health, sandboxpool.EnvCreateRate: rate, sandboxpool.EnvCreateBurst: burst,
			sandboxpool.EnvCreatePer: per, sandboxpool.EnvLockTTL: lockTTL, sandboxpool.EnvUnresponsiveAfter: unresponsive,
		}
		cfg, err := sandboxpool.ConfigFrom(env)
		if err != nil {
			named := false
			for name := range env {
				named = named || strings.Contains(err.Error(), name)
			}
			require.True(t, named, "the error names a variable: %v", err)
			return
		}
		cfg.Provider = fakeprovider.New()
		m, err := sandboxpool.New(cfg)
		if err != nil {
			require.ErrorContains(t, err, "sandboxpool: invalid config")
			return
		}
		defer func() { require.NoError(t, m.Close(context.Background())) }()
		c := sandboxpool.EffectiveConfig(m)
		for _, d := range []time.Duration{c.IdleTimeout, c.MaxAge, c.ReapInterval, c.CreateTimeout, c.RedisTimeout, c.LockTTL, c.HealthCheckAfter, c.UnresponsiveAfter, c.CreateLimit.Per} {
			require.LessOrEqual(t, d, sandboxpool.MaxDuration)
		}
		require.GreaterOrEqual(t, c.IdleTimeout, time.Second, "E2B timeouts are whole seconds")
		require.GreaterOrEqual(t, c.MaxAge, c.IdleTimeout)
		require.Positive(t, c.ReapInterval)
		require.LessOrEqual(t, c.ReapInterval, c.IdleTimeout/8, "the reaper's tick leaves room to push a deadline in use")
		require.GreaterOrEqual(t, c.LockTTL, time.Millisecond, "Redis expiries are whole milliseconds")
		require.Positive(t, c.CreateTimeout)
		require.Positive(t, c.RedisTimeout)
		require.GreaterOrEqual(t, c.HealthCheckAfter, time.Duration(-1))
		require.GreaterOrEqual(t, c.UnresponsiveAfter, time.Duration(-1))
		require.NotZero(t, c.UnresponsiveAfter, "0 means the default")
		if c.CreateLimit.Rate > 0 {
			require.Positive(t, c.CreateLimit.Burst)
			require.Positive(t, c.CreateLimit.Per)
		}
		// A first create of a pair is within every limit New accepts. A
		// CreateTimeout too short for any create is the operator's choice,
		// and fails as a deadline.
		l, err := m.Acquire(context.Background(), "u", "p")
		if err != nil {
			require.ErrorIs(t, err, context.DeadlineExceeded, "CreateTimeout %s", c.CreateTimeout)
			return
		}
		require.Equal(t, sandboxpool.OutcomeCreated, l.Outcome())
		l.Release()
	})
}
