package sandboxpool

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// suspectProbeEvery spaces the probes of a suspect: an Acquire within it
// of the suspect's last probe fails at once with that probe's error. A hot
// pair whose sandbox hung then costs the provider one probe a second (two
// E2B calls) on each instance, not one per Acquire, so that many sandboxes
// hanging at once (an E2B incident) does not spend the API's rate limit
// that the healthy pairs need. It is also the longest a sandbox that
// answers again goes on failing its pair's Acquires.
const suspectProbeEvery = time.Second

// incidentSuspects is how many sandboxes unresponsive at once, with no
// probe answering since the spell of the one due to be condemned began,
// make the Manager doubt that the fault is theirs. A hung VM is one
// sandbox's fault; every sandbox's envd failing together is the way to
// them (E2B's sandbox proxy in an incident), where a replacement hangs
// too and a kill destroys what the sandbox held. Then only one of them is
// condemned every UnresponsiveAfter, a canary: if its replacement answers
// a probe, the others are condemned at their next probes; if it hangs too,
// the rest are spared until the way to them is back, when their probes
// acquit them. Two at once still look like two faults.
const incidentSuspects = 3

// suspects are the pooled sandboxes whose latest probe found them
// unresponsive (ErrSandboxUnresponsive). A suspect is probed at the pair's
// Acquires, at most once every suspectProbeEvery, until a probe answers,
// which acquits it, or it has been unresponsive for
// Config.UnresponsiveAfter, which condemns it: it is killed and replaced
// like a sandbox gone. No memory hit skips the probe: its last good check
// is over HealthCheckAfter old, and only an answering probe renews it (the
// API answers keepalives for a sandbox that does not). The map holds only
// suspects, and a slot leaves it when it leaves the pool (forgetLocal), so
// it never outgrows the pool.
type suspects struct {
	mu sync.Mutex
	m  map[*slot]suspicion
	// answered is when a probe of any sandbox last answered (unix ns),
	// and canary when the latest condemnation made without one since
	// the condemned sandbox's spell began (see incidentSuspects).
	answered, canary atomic.Int64
	// spell is on once the current spell of spared sandboxes was logged,
	// and ends, with no line, when a probe answers.
	spell failureEpisode
}

// suspicion is what a suspect's probes found.
type suspicion struct {
	since, last int64 // unix ns: the first failing probe since one answered, and the latest
	err         error // the latest probe's error
}

// suspect records a probe at now that found s unresponsive with err, and
// returns what is known of s.
func (m *Manager) suspect(s *slot, now int64, err error) suspicion {
	m.suspects.mu.Lock()
	sp, ok := m.suspects.m[s]
	if !ok {
		sp.since = now
		s.setFlag(flagSuspect)
	}
	sp.last, sp.err = now, err
	m.suspects.m[s] = sp
	m.suspects.mu.Unlock()
	if !ok && s.state() != stateLive {
		// It left the pool during the probe, and forgetLocal may already
		// have looked for it here.
		m.acquit(s)
	}
	return sp
}

// spare reports whether a suspect due for condemnation (its suspicion
// sp) is spared, with how many sandboxes are suspect: when at least
// incidentSuspects are and no probe has answered since its spell began,
// unless no canary was condemned within UnresponsiveAfter, in which case
// this one is the canary (see incidentSuspects), and canary says so.
func (m *Manager) spare(sp suspicion, now int64) (n int, spare, canary bool) {
	m.suspects.mu.Lock()
	n = len(m.suspects.m)
	m.suspects.mu.Unlock()
	if n < incidentSuspects || m.suspects.answered.Load() >= sp.since {
		return n, false, false
	}
	last := m.suspects.canary.Load()
	if last != 0 && now-last < int64(m.cfg.UnresponsiveAfter) || !m.suspects.canary.CompareAndSwap(last, now) {
		return n, true, false
	}
	return n, false, true
}

// probeAnswered records that a probe at now answered: the way to the
// sandboxes works, and suspects are condemned again as they come due.
func (m *Manager) probeAnswered(now int64) {
	for {
		last := m.suspects.answered.Load()
		if now <= last || m.suspects.answered.CompareAndSwap(last, now) {
			break
		}
	}
	m.suspects.spell.succeeded(context.Background(), m.log) // most probes answer: they only read its flag
}

// acquit forgets that s was unresponsive: a probe answered, or s left the
// pool.
func (m *Manager) acquit(s *slot) {
	if !s.hasFlag(flagSuspect) {
		return
	}
	m.suspects.mu.Lock()
	delete(m.suspects.m, s)
	s.clearFlag(flagSuspect)
	m.suspects.mu.Unlock()
}

// recentVerdict returns, for a suspect probed less than suspectProbeEvery
// before now, the error its Acquire fails with instead of probing again;
// nil otherwise.
func (m *Manager) recentVerdict(s *slot, now int64) error {
	if !s.hasFlag(flagSuspect) {
		return nil
	}
	m.suspects.mu.Lock()
	sp, ok := m.suspects.m[s]
	m.suspects.mu.Unlock()
	if !ok || now-sp.last >= int64(suspectProbeEvery) {
		return nil
	}
	return m.unresponsiveErr(sp, now)
}

// unresponsiveErr is a suspect's error for its caller: its latest probe's,
// carrying how long until the suspect is condemned as a retry hint.
func (m *Manager) unresponsiveErr(sp suspicion, now int64) error {
	if m.cfg.UnresponsiveAfter < 0 {
		return sp.err
	}
	return &RetryAfterError{Err: sp.err, RetryAfter: time.Duration(max(sp.since+int64(m.cfg.UnresponsiveAfter)-now, 0))}
}

// condemn records a probe at now that found s unresponsive (probeErr) and,
// once s has been unresponsive for UnresponsiveAfter, kills it. It reports
// whether it did; if not, it returns the error for the caller (see
// unresponsiveErr), with the kill's failure if the kill was tried (the
// next probe tries again). A killed s is replaced by the caller like a
// sandbox gone, and announced as a Remove's sandboxes are: another
// instance may hold it, checked too recently to probe it before a memory
// hit hands it out.
func (m *Manager) condemn(ctx context.Context, s *slot, now int64, probeErr error) (bool, error) {
	sp := m.suspect(s, now, probeErr)
	if m.cfg.UnresponsiveAfter < 0 || now-sp.since < int64(m.cfg.UnresponsiveAfter) {
		return false, m.unresponsiveErr(sp, now)
	}
	n, spare, canary := m.spare(sp, now)
	if spare {
		m.ctr.spared.Add(1)
		if m.suspects.spell.failed(true) == slog.LevelWarn {
			m.log.LogAttrs(ctx, slog.LevelWarn, "sandboxpool: sandboxes unresponsive together and no probe answering: sparing them, as the fault looks like the way to them; one is replaced every UnresponsiveAfter to tell",
				slog.Int("unresponsive", n), slog.Duration("unresponsive_after", m.cfg.UnresponsiveAfter))
		}
		return false, &RetryAfterError{Err: probeErr, RetryAfter: suspectProbeEvery}
	}
	if err := m.killID(ctx, s.id, "unresponsive"); err != nil { // counted and logged
		return false, errors.Join(probeErr, err)
	}
	s.setFlag(flagKilled)
	m.ctr.unresponsive.Add(1)
	// A canary of a spell already logged is what that line announced, one
	// every UnresponsiveAfter for as long as the incident lasts: Info (a
	// 27-second spell of the soak logged 99 Warn lines on 4 Managers).
	level := slog.LevelWarn
	if canary && m.suspects.spell.on.Load() {
		level = slog.LevelInfo
	}
	m.log.LogAttrs(ctx, level, "sandboxpool: unresponsive sandbox killed, to be replaced",
		slog.String("sandbox", s.id), slog.Duration("unresponsive_for", time.Duration(now-sp.since)), slog.Bool("canary", canary))
	if err := m.announceRemoval(ctx, s.key, []string{s.id}); err != nil {
		// Unless Redis refused, it is announced once Redis answers again;
		// instances not told find it gone at their next probe.
		m.log.LogAttrs(ctx, m.redisFailureLevel(err), "sandboxpool: announcing a condemned sandbox to other instances failed", slog.String("sandbox", s.id), attrErr(err))
	}
	return true, nil
}
