package sandboxpool

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/bits"
	"os"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// Defaults. Each is documented on the Config field it fills.
const (
	DefaultNamespace        = "sandboxpool"
	DefaultTemplate         = "base"
	DefaultIdleTimeout      = 5 * time.Minute
	DefaultMaxAge           = 15 * time.Minute
	DefaultHealthCheckAfter = 30 * time.Second
	// DefaultUnresponsiveAfter is long enough that a blip of E2B's envd
	// proxy, which clears at the next probe, never condemns a sandbox (a
	// sandbox just resumed may briefly not answer: e2b-dev/E2B#1030), and
	// short next to DefaultMaxAge, which would otherwise bound how long a
	// hung sandbox fails its pair's Acquires (e2b-dev/code-interpreter#147
	// reports envd's proxy answering "not found" for sandboxes well before
	// their timeout).
	DefaultUnresponsiveAfter = time.Minute
	DefaultReapInterval      = time.Second
	DefaultCreateTimeout     = 2 * time.Minute
	DefaultRedisTimeout      = 500 * time.Millisecond
	DefaultLockTTL           = 10 * time.Second
	DefaultShards            = 64
)

// minLockTTL is the shortest Config.LockTTL: Redis keeps a key's expiry in
// whole milliseconds and refuses an expiry of 0.
const minLockTTL = time.Millisecond

// MaxDuration is the longest duration a Config holds: New treats a longer
// one as MaxDuration. A century outlasts any sandbox, so the largest
// time.Duration, Go's usual "no limit", still means no limit (MaxAge:
// math.MaxInt64 keeps a sandbox for as long as it is used; HealthCheckAfter:
// math.MaxInt64 never probes a pooled one). The cap is what makes that safe:
// the Manager keeps its deadlines as unix nanoseconds, each a timestamp plus
// one duration, and with durations of at most a century those sums stay
// below math.MaxInt64 until the year 2160.
const MaxDuration = 100 * 365 * 24 * time.Hour

// maxReapFraction bounds Config.ReapInterval at IdleTimeout/8. The reaper
// first visits a sandbox in use visitLead (3/8 IdleTimeout with a slow
// tick) before its provider deadline, to push that deadline, and a visit
// runs at the first tick after it is due. With a tick of at most 1/8
// IdleTimeout, that visit and its first retry (see Manager.retryTouchAt)
// both start at least 1/8 IdleTimeout before the deadline, which leaves
// the push that long for its I/O.
const maxReapFraction = 8

// maxShards bounds Config.Shards: beyond this the shard array costs more
// memory than contention it saves on a machine with a sane core count.
const maxShards = 1 << 16

// RateLimit is a rate of Rate events per Per, with bursts of up to Burst.
// The zero value means unlimited.
type RateLimit struct {
	Rate  int           // events per Per; 0 = unlimited
	Burst int           // default: Rate
	Per   time.Duration // default: 1 second
}

func (r RateLimit) enabled() bool { return r.Rate > 0 }

// interval is the steady-state spacing between two events.
func (r RateLimit) interval() time.Duration { return r.Per / time.Duration(r.Rate) }

// Config configures a Manager. The zero value of every field except Provider
// selects the documented default. New copies the Config; later changes to the
// caller's value have no effect. A duration longer than MaxDuration (a
// century) counts as MaxDuration.
type Config struct {
	// Provider creates and manages sandboxes. Required. Use NewE2BProvider
	// for E2B.
	Provider Provider

	// Redis, when set, makes the pool safe to share between processes: it
	// holds the pair → sandbox cache, the per-pair create lock, the idle
	// clock, quotas and rate limits. Standalone, Sentinel and Cluster clients
	// all work, on Redis 4.0 or later: nothing the Manager sends, in its
	// scripts or through redislock and redis_rate, is newer. A master
	// that fails over to its replica is followed at once: the Manager has
	// a Cluster client read the cluster's map again whenever a call gets
	// no answer (go-redis alone waits for a MOVED reply, or a minute), and
	// a Sentinel client follows its sentinels. The client
	// must be built with ContextTimeoutEnabled: true (New refuses a
	// go-redis client without it), or go-redis ignores RedisTimeout on a
	// stalled server. Give the Manager a client of its own: it runs as
	// many calls at once as the client pools connections, and where the
	// application's calls hold them, the Manager's wait for one past
	// RedisTimeout, count as Redis failures, and can open its circuit
	// breaker while Redis is well. Its maxmemory-policy should be
	// noeviction: every key the pool writes expires, so a full Redis under
	// any other (volatile-lru is the managed services' default) drops
	// create locks and records, and lets duplicates through; the Manager
	// reads the policy from New on, and every minute after, warns when a
	// master evicts and sets Stats().RedisEvicts.
	// default: nil, a single-process, memory-only pool.
	Redis redis.UniversalClient

	// Namespace prefixes every Redis key and is stored in each sandbox's
	// metadata, so independent deployments can share a Redis and an E2B
	// team. 1–64 bytes of A-Z a-z 0-9 . _ - @ + =. default: "sandboxpool".
	Namespace string

	// Template is the sandbox template to create. A pair's sandbox is
	// reused whatever template it was made from (Sandbox.Template says
	// which), so after Template changes (a deploy) each pair moves to the
	// new one when its sandbox reaches MaxAge, or at once if Removed.
	// default: "base".
	Template string

	// Metadata is added to every created sandbox's metadata. Keys starting
	// with "sandboxpool." are reserved. default: none.
	Metadata map[string]string

	// IdleTimeout is how long an unleased sandbox survives without use.
	// It is the timeout sent to E2B on create and connect, which E2B
	// refuses (400) beyond the longest life your team allows a sandbox.
	// default: 5 minutes.
	IdleTimeout time.Duration

	// MaxAge is the longest a sandbox is handed out after its creation;
	// must be >= IdleTimeout. A sandbox past MaxAge is destroyed once its
	// last lease is released. Keep it within the longest life your E2B
	// team allows a sandbox (1 hour on Hobby, 24 on Pro): E2B ends a
	// sandbox there whatever its timeout, and the pool learns of it only
	// at the sandbox's next probe or keepalive. default: 15 minutes.
	MaxAge time.Duration

	// HealthCheckAfter skips the liveness probe for a sandbox checked this
	// recently, so a hot pair costs no I/O. -1 probes on every Acquire. A
	// probe that gets no answer within 10 seconds fails the Acquire and
	// keeps the sandbox. default: 30 seconds.
	HealthCheckAfter time.Duration

	// UnresponsiveAfter is how long a sandbox may stay unresponsive (the
	// provider reports it running, but it does not answer:
	// ErrSandboxUnresponsive) before the Manager kills and replaces it.
	// Until then the pair's Acquires fail with that error and keep the
	// sandbox, which is probed at them, at most once a second (the Acquires
	// in between fail at once); a probe that answers clears it. It is
	// condemned at a failing probe UnresponsiveAfter or more after the
	// first failing one, unless 3 or more sandboxes are unresponsive and
	// no probe has answered since: then one is condemned every
	// UnresponsiveAfter, and the others only once a probe answers (see
	// Stats.Spared). If every sandbox is condemned, suspect the
	// route to envd (E2B_DOMAIN, E2B_SANDBOX_URL) before E2B. -1 never
	// condemns: a hung sandbox then fails its pair's Acquires until MaxAge.
	// default: 1 minute.
	UnresponsiveAfter time.Duration

	// ReapInterval is how often the reaper looks for expired sandboxes. A
	// tick costs O(sandboxes due), not O(pool size). At most IdleTimeout/8
	// (maxReapFraction). default: 1 second, or IdleTimeout/8 if shorter.
	ReapInterval time.Duration

	// CreateTimeout bounds a create (lock wait included) independently of
	// the caller's context: a create that has started finishes, or fails,
	// within it even if the caller gives up. default: 2 minutes.
	CreateTimeout time.Duration

	// RedisTimeout bounds every single Redis call. Once Redis has answered
	// nothing for this long, three failed calls in a row open the circuit
	// breaker (the pool then serves from memory and creates without the
	// lock, or refuses: see RefuseCreatesWhenDegraded). A process paused
	// for longer (CPU throttling under a container limit, say) hears
	// nothing either, so keep it above the longest pause the process may
	// see. default: 500 ms.
	RedisTimeout time.Duration

	// LockTTL is the expiry of the per-pair create lock in Redis; it is
	// refreshed every LockTTL/3 while the create runs, so a holder that
	// dies frees the pair within LockTTL. At least 1ms. default: 10 seconds.
	LockTTL time.Duration

	// MaxSandboxes caps the pairs with a sandbox alive at once
	// (cluster-wide with Redis). A pair counts once while its sandbox is
	// replaced (past MaxAge, say), so a replacement is never refused: only
	// a create for a pair without a sandbox is, with ErrQuotaExceeded.
	// default: 0, unlimited.
	MaxSandboxes int

	// MaxPerUser caps the pairs with a sandbox of one user, counted as
	// MaxSandboxes counts them (cluster-wide with Redis). default: 0,
	// unlimited.
	MaxPerUser int

	// CreateLimit limits fresh creates per user (reuse is never limited);
	// refused creates get ErrRateLimited with a retry-after. A pair's new
	// sandbox at MaxAge, or after its sandbox died, is a create and
	// counts: size the limit for a user's pairs turning over once per
	// MaxAge. default: zero, unlimited.
	CreateLimit RateLimit

	// RefuseCreatesWhenDegraded makes the Manager refuse fresh creates with
	// ErrUnavailable while Redis is unreachable (or, in a Cluster, the
	// master holding the keys a create needs is lost with no replica to
	// take its place), instead of creating without the cross-instance lock. Sandboxes already in memory are served either
	// way. default: false (create and count it in Stats().DegradedCreates).
	RefuseCreatesWhenDegraded bool

	// Shards is the number of in-memory pool shards, rounded up to a power
	// of two. default: 64.
	Shards int

	// Logger receives the Manager's background events (evictions, failed
	// kills, Redis state changes). Errors on the request path are returned,
	// not logged. default: nil, discard: a library should not write to an
	// application's logs unless asked to; pass slog.Default() to opt in.
	Logger *slog.Logger

	// OnAcquire, when set, is called after every Acquire that passed
	// validation with how it was served and how long it took (metrics; see
	// package metrics). It runs on the caller's goroutine and must be fast.
	// If it panics, Acquire panics with it, and releases the lease it took.
	// default: nil (no timing cost on the hot path).
	OnAcquire func(Outcome, time.Duration)

	// now replaces time.Now in tests.
	now func() time.Time
	// clockSource replaces the real clock's readings of the wall and
	// monotonic clocks in tests (see clock).
	clockSource func() (wall, mono int64)
	// breakerCooldown, probeInterval and removalPingAfter shorten Redis
	// recovery in tests.
	breakerCooldown, probeInterval, removalPingAfter time.Duration
	// evictionRecheck shortens how often Redis's eviction policy is read
	// again in tests.
	evictionRecheck time.Duration
	// workerIdle shortens a background worker's idle wait in tests.
	workerIdle time.Duration
	// checkTimeout shortens the bound on a liveness probe in tests.
	checkTimeout time.Duration
	// manualReap leaves the reaper to tests, which tick it with a fake clock.
	manualReap bool
}

// withDefaults returns a copy of c with zero fields set to their defaults.
func (c Config) withDefaults() Config {
	c.Metadata = maps.Clone(c.Metadata)
	setDefault(&c.Namespace, DefaultNamespace)
	setDefault(&c.Template, DefaultTemplate)
	setDefault(&c.IdleTimeout, DefaultIdleTimeout)
	setDefault(&c.MaxAge, DefaultMaxAge)
	setDefault(&c.HealthCheckAfter, DefaultHealthCheckAfter)
	setDefault(&c.UnresponsiveAfter, DefaultUnresponsiveAfter)
	if c.IdleTimeout > 0 {
		setDefault(&c.ReapInterval, min(DefaultReapInterval, c.IdleTimeout/maxReapFraction))
	}
	setDefault(&c.CreateTimeout, DefaultCreateTimeout)
	setDefault(&c.RedisTimeout, DefaultRedisTimeout)
	setDefault(&c.LockTTL, DefaultLockTTL)
	setDefault(&c.Shards, DefaultShards)
	if c.CreateLimit.enabled() {
		setDefault(&c.CreateLimit.Burst, c.CreateLimit.Rate)
		setDefault(&c.CreateLimit.Per, time.Second)
	}
	for _, d := range []*time.Duration{&c.IdleTimeout, &c.MaxAge, &c.HealthCheckAfter, &c.UnresponsiveAfter,
		&c.ReapInterval, &c.CreateTimeout, &c.RedisTimeout, &c.LockTTL, &c.CreateLimit.Per} {
		*d = min(*d, MaxDuration)
	}
	if c.Shards > 0 && c.Shards <= maxShards {
		c.Shards = 1 << bits.Len(uint(c.Shards-1))
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.now == nil {
		c.now = time.Now
	}
	setDefault(&c.breakerCooldown, breakerCooldown)
	setDefault(&c.probeInterval, redisProbeInterval)
	setDefault(&c.removalPingAfter, removalPingAfter)
	setDefault(&c.evictionRecheck, evictionRecheck)
	setDefault(&c.workerIdle, workerIdle)
	setDefault(&c.checkTimeout, checkTimeout)
	return c
}

func setDefault[T comparable](v *T, def T) {
	var zero T
	if *v == zero {
		*v = def
	}
}

// validate reports every problem with a defaulted config at once.
func (c *Config) validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if c.Provider == nil {
		bad("Provider is required (use NewE2BProvider, or set E2B_API_KEY for ConfigFromEnv)")
	}
	if err := validateID("namespace", c.Namespace, maxNamespaceLen); err != nil {
		bad("Namespace: %w", err)
	}
	for name, d := range map[string]time.Duration{
		"IdleTimeout": c.IdleTimeout, "MaxAge": c.MaxAge, "ReapInterval": c.ReapInterval,
		"CreateTimeout": c.CreateTimeout, "RedisTimeout": c.RedisTimeout, "LockTTL": c.LockTTL,
	} {
		if d < 0 {
			bad("%s must not be negative (got %s)", name, d)
		}
	}
	if c.HealthCheckAfter < -1 {
		bad("HealthCheckAfter must be -1 (always probe), 0 (default) or positive (got %s)", c.HealthCheckAfter)
	}
	if c.UnresponsiveAfter < -1 {
		bad("UnresponsiveAfter must be -1 (never condemn), 0 (default) or positive (got %s)", c.UnresponsiveAfter)
	}
	if c.MaxAge < c.IdleTimeout {
		bad("MaxAge (%s) must be >= IdleTimeout (%s)", c.MaxAge, c.IdleTimeout)
	}
	if c.LockTTL > 0 && c.LockTTL < minLockTTL {
		// Redis would refuse the lock's expiry, and every create would run
		// uncoordinated, counted only as a Redis error.
		bad("LockTTL must be at least %s: Redis expiries are whole milliseconds (got %s)", minLockTTL, c.LockTTL)
	}
	if c.ReapInterval > c.IdleTimeout/maxReapFraction && c.IdleTimeout > 0 {
		bad("ReapInterval (%s) must be at most IdleTimeout/%d (%s): the reaper pushes the provider deadline of a sandbox in use "+
			"at its first tick after 3/8 of IdleTimeout before that deadline, and a slower tick lets the provider end a sandbox in use",
			c.ReapInterval, maxReapFraction, c.IdleTimeout/maxReapFraction)
	}
	if c.IdleTimeout > 0 && c.IdleTimeout < time.Second {
		bad("IdleTimeout must be at least 1s: E2B timeouts are whole seconds (got %s)", c.IdleTimeout)
	}
	if c.MaxSandboxes < 0 || c.MaxPerUser < 0 {
		bad("MaxSandboxes and MaxPerUser must not be negative")
	}
	if c.MaxSandboxes > 0 && c.MaxPerUser > c.MaxSandboxes {
		bad("MaxPerUser (%d) must not exceed MaxSandboxes (%d)", c.MaxPerUser, c.MaxSandboxes)
	}
	if r := c.CreateLimit; r.Rate < 0 || r.Burst < 0 || r.Per < 0 {
		bad("CreateLimit fields must not be negative")
	} else if r.enabled() && r.interval() <= 0 {
		bad("CreateLimit: Rate %d per %s is finer than 1ns", r.Rate, r.Per)
	} else if r.enabled() && r.Burst > int(MaxDuration/r.interval()) {
		// The limiter keeps Burst × Per/Rate as nanoseconds.
		bad("CreateLimit: a burst of %d at %d per %s spans more than MaxDuration", r.Burst, r.Rate, r.Per)
	}
	if c.Redis != nil && !honoursContextDeadlines(c.Redis) {
		bad("Redis: build the go-redis client with ContextTimeoutEnabled: true, so that RedisTimeout (%s) bounds every call: "+
			"without it go-redis ignores context deadlines on its socket and waits out its ReadTimeout (5s by default, forever at -1) on a stalled Redis", c.RedisTimeout)
	}
	if c.Shards < 1 || c.Shards > maxShards {
		bad("Shards must be between 1 and %d (got %d)", maxShards, c.Shards)
	}
	for k := range c.Metadata {
		if len(k) >= len("sandboxpool.") && k[:len("sandboxpool.")] == "sandboxpool." {
			bad("Metadata key %q uses the reserved prefix sandboxpool.", k)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("sandboxpool: invalid config: %w", errors.Join(errs...))
	}
	return nil
}

// clientOptions are the options of a go-redis client the Manager reads.
type clientOptions struct {
	contextTimeout           bool
	poolSize, maxActiveConns int // per node for a Cluster or a Ring
}

// optionsOf reads rdb's options, if it is one of go-redis's own clients
// (failover clients are *redis.Client); ok is false for another type (a
// wrapper).
func optionsOf(rdb redis.UniversalClient) (o clientOptions, ok bool) {
	switch c := rdb.(type) {
	case *redis.Client:
		opt := c.Options()
		return clientOptions{opt.ContextTimeoutEnabled, opt.PoolSize, opt.MaxActiveConns}, true
	case *redis.ClusterClient:
		opt := c.Options()
		return clientOptions{opt.ContextTimeoutEnabled, opt.PoolSize, opt.MaxActiveConns}, true
	case *redis.Ring:
		opt := c.Options()
		return clientOptions{opt.ContextTimeoutEnabled, opt.PoolSize, opt.MaxActiveConns}, true
	}
	return clientOptions{}, false
}

// honoursContextDeadlines reports whether rdb applies a call's context
// deadline to its socket reads and writes, which a go-redis client does
// only when built with ContextTimeoutEnabled. A client of another type (a
// wrapper) is taken at its word.
func honoursContextDeadlines(rdb redis.UniversalClient) bool {
	o, ok := optionsOf(rdb)
	return !ok || o.contextTimeout
}

// Environment variables read by ConfigFromEnv.
const (
	EnvNamespace         = "SANDBOXPOOL_NAMESPACE"
	EnvTemplate          = "SANDBOXPOOL_TEMPLATE"
	EnvIdleTimeout       = "SANDBOXPOOL_IDLE_TIMEOUT"
	EnvMaxAge            = "SANDBOXPOOL_MAX_AGE"
	EnvHealthCheckAfter  = "SANDBOXPOOL_HEALTH_CHECK_AFTER"
	EnvUnresponsiveAfter = "SANDBOXPOOL_UNRESPONSIVE_AFTER"
	EnvReapInterval      = "SANDBOXPOOL_REAP_INTERVAL"
	EnvCreateTimeout     = "SANDBOXPOOL_CREATE_TIMEOUT"
	EnvRedisTimeout      = "SANDBOXPOOL_REDIS_TIMEOUT"
	EnvLockTTL           = "SANDBOXPOOL_LOCK_TTL"
	EnvMaxSandboxes      = "SANDBOXPOOL_MAX_SANDBOXES"
	EnvMaxPerUser        = "SANDBOXPOOL_MAX_PER_USER"
	EnvCreateRate        = "SANDBOXPOOL_CREATE_RATE"
	EnvCreateBurst       = "SANDBOXPOOL_CREATE_BURST"
	EnvCreatePer         = "SANDBOXPOOL_CREATE_PER"
	EnvRefuseDegraded    = "SANDBOXPOOL_REFUSE_CREATES_WHEN_DEGRADED"
)

// envSource lets tests (and ConfigFromEnv) read variables from anywhere.
type envSource func(string) (string, bool)

// ConfigFromEnv builds a Config from the environment: the SANDBOXPOOL_*
// variables for pool settings, E2B_API_KEY, E2B_API_URL, E2B_DOMAIN and
// E2B_SANDBOX_URL for the provider, REDIS_URL for Redis. Unset variables
// leave their defaults. A malformed variable is an error naming it.
func ConfigFromEnv() (Config, error) { return configFrom(os.LookupEnv) }

func configFrom(env envSource) (Config, error) {
	var c Config
	var errs []error
	str := func(name string, dst *string) {
		if v, ok := env(name); ok {
			*dst = v
		}
	}
	dur := func(name string, dst *time.Duration) {
		if v, ok := env(name); ok && v != "" {
			d, err := time.ParseDuration(v)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %q is not a duration such as 90s or 5m", name, v))
				return
			}
			*dst = d
		}
	}
	num := func(name string, dst *int) {
		if v, ok := env(name); ok && v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				errs = append(errs, fmt.Errorf("%s: %q is not a non-negative integer", name, v))
				return
			}
			*dst = n
		}
	}
	str(EnvNamespace, &c.Namespace)
	str(EnvTemplate, &c.Template)
	dur(EnvIdleTimeout, &c.IdleTimeout)
	dur(EnvMaxAge, &c.MaxAge)
	dur(EnvHealthCheckAfter, &c.HealthCheckAfter)
	dur(EnvUnresponsiveAfter, &c.UnresponsiveAfter)
	dur(EnvReapInterval, &c.ReapInterval)
	dur(EnvCreateTimeout, &c.CreateTimeout)
	dur(EnvRedisTimeout, &c.RedisTimeout)
	dur(EnvLockTTL, &c.LockTTL)
	num(EnvMaxSandboxes, &c.MaxSandboxes)
	num(EnvMaxPerUser, &c.MaxPerUser)
	num(EnvCreateRate, &c.CreateLimit.Rate)
	num(EnvCreateBurst, &c.CreateLimit.Burst)
	dur(EnvCreatePer, &c.CreateLimit.Per)
	if v, ok := env(EnvRefuseDegraded); ok && v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %q is not a boolean (true/false)", EnvRefuseDegraded, v))
		}
		c.RefuseCreatesWhenDegraded = b
	}
	for _, hook := range envHooks {
		if err := hook(env, &c); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return Config{}, fmt.Errorf("sandboxpool: config from environment: %w", errors.Join(errs...))
	}
	return c, nil
}

// envHooks turn further variables into Config fields (the provider, Redis).
// They are registered by the files that own those concepts.
var envHooks []func(envSource, *Config) error
