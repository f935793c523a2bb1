package sandboxpool

import (
	"context"
	"errors"
	"log/slog"
	"sync"
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
	if err := m.killID(ctx, s.id, "unresponsive"); err != nil { // counted and logged
		return false, errors.Join(probeErr, err)
	}
	s.setFlag(flagKilled)
	m.ctr.unresponsive.Add(1)
	m.log.LogAttrs(ctx, slog.LevelWarn, "sandboxpool: unresponsive sandbox killed, to be replaced",
		slog.String("sandbox", s.id), slog.Duration("unresponsive_for", time.Duration(now-sp.since)))
	if err := m.announceRemoval(ctx, s.key, []string{s.id}); err != nil {
		// Unless Redis refused, it is announced once Redis answers again;
		// instances not told find it gone at their next probe.
		m.log.LogAttrs(ctx, slogWarn, "sandboxpool: announcing a condemned sandbox to other instances failed", slog.String("sandbox", s.id), attrErr(err))
	}
	return true, nil
}
