package sandboxpool

import (
	"runtime"
	"strings"
	"time"
)

// Test hooks, compiled only into this package's tests.

// SetClock makes a Manager built from cfg read time from now.
func SetClock(cfg *Config, now func() time.Time) { cfg.now = now }

// SetClockSource makes a Manager built from cfg run the real clock on
// readings of the wall and monotonic clocks (unix ns, ns) from source.
func SetClockSource(cfg *Config, source func() (wall, mono int64)) { cfg.clockSource = source }

// SetCheckTimeout bounds the liveness probes of a Manager built from cfg.
func SetCheckTimeout(cfg *Config, d time.Duration) { cfg.checkTimeout = d }

// ManualReaper makes a Manager built from cfg tick its reaper only when
// the test calls ReapNow.
func ManualReaper(cfg *Config) { cfg.manualReap = true }

// ReapNow runs one reaper tick synchronously.
func (m *Manager) ReapNow() { m.reapOnce() }

// Scheduled returns how many slots the reaper tracks.
func (m *Manager) Scheduled() int { return m.reaper.len() }

// PopDue exposes the reaper's heap pop, to measure what a tick touches.
func (m *Manager) PopDue(now time.Time) int { return len(m.reaper.popDue(now.UnixNano())) }

// RedisKey exposes the pair → key mapping for the fuzz test.
func RedisKey(ns, user, project, suffix string) string {
	return pairKey{user, project}.redisKey(ns, suffix)
}

// SetDefaultBuilder replaces Default's builder and resets its once.
func SetDefaultBuilder(b func() (*Manager, error)) (restore func()) {
	old := buildDefault
	buildDefault = b
	defaultManager = onceDefault()
	return func() {
		buildDefault = old
		defaultManager = onceDefault()
	}
}

// ResetDefault makes Default build again, with its own builder, on its
// next call, and again after restore.
func ResetDefault() (restore func()) {
	defaultManager = onceDefault()
	return func() { defaultManager = onceDefault() }
}

// RemovalMessage and ParseRemoval expose the removal announcement's format
// to its fuzz test.
func RemovalMessage(user, project string, ids []string) string {
	return removalMessage(pairKey{user, project}, ids)
}

func ParseRemoval(msg string) (user, project string, ids []string, ok bool) {
	k, ids, ok := parseRemoval(msg)
	return k.user, k.project, ids, ok
}

// ParseRecord exposes the parsing of a pair's Redis record to its fuzz
// test: times in unix ns.
func ParseRecord(vals map[string]string) (id string, created, deadline int64, ok bool, err error) {
	rec, ok, err := parseRecord(vals)
	return rec.id, rec.created, rec.deadline, ok, err
}

// ConfigFrom exposes the environment parser with an explicit source.
func ConfigFrom(env map[string]string) (Config, error) {
	return configFrom(func(k string) (string, bool) { v, ok := env[k]; return v, ok })
}

// FastRedisRecovery shortens the breaker cooldown, the probe interval and
// how long the removal subscription may stay quiet before it is pinged.
func FastRedisRecovery(cfg *Config, d time.Duration) {
	cfg.breakerCooldown, cfg.probeInterval, cfg.removalPingAfter = d, d, d
}

// SlowRedisProbe sets how often the background probe runs: the probe
// publishes what was created while Redis was down and makes the removals
// Redis did not answer, so a long interval leaves both to Close.
func SlowRedisProbe(cfg *Config, every time.Duration) { cfg.probeInterval = every }

// EvictionRecheck sets how often the Manager reads Redis's eviction policy
// again.
func EvictionRecheck(cfg *Config, every time.Duration) { cfg.evictionRecheck = every }

// EffectiveConfig returns the Config a Manager runs with: defaults filled,
// durations capped.
func EffectiveConfig(m *Manager) Config { return m.cfg }

// SuspectProbeEvery is the shortest time between two probes of a suspect.
const SuspectProbeEvery = suspectProbeEvery

// Suspects returns how many sandboxes the Manager holds as unresponsive.
func Suspects(m *Manager) int {
	m.suspects.mu.Lock()
	defer m.suspects.mu.Unlock()
	return len(m.suspects.m)
}

// RefusingWrites reports whether m's Redis store is in an episode of
// refused writes (see store.writesRefused).
func RefusingWrites(m *Manager) bool { return m.store.refusedAt.Load() != 0 }

// GoroutineStacks is every goroutine's stack, one string each, for tests
// that count the goroutines running a function.
func GoroutineStacks() []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return strings.Split(string(buf[:n]), "\n\n")
		}
		buf = make([]byte, 2*len(buf))
	}
}
