package sandboxpool

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"
)

// suspects are the pooled sandboxes whose latest probe found them
// unresponsive (ErrSandboxUnresponsive), each with the time of the first
// such probe since one last answered. A suspect is probed at every Acquire
// until a probe answers, which acquits it, or it has been unresponsive for
// Config.UnresponsiveAfter, which condemns it: it is killed and replaced
// like a sandbox gone. No memory hit skips the probe: its last good check
// is over HealthCheckAfter old, and only an answering probe renews it (the
// API answers keepalives for a sandbox that does not). The map holds only
// suspects, and a slot leaves it when it leaves the pool (forgetLocal), so
// it never outgrows the pool.
type suspects struct {
	mu    sync.Mutex
	since map[*slot]int64 // unix ns of the first failing probe
}

// suspect records a probe at now that found s unresponsive and returns
// when s was first found so.
func (m *Manager) suspect(s *slot, now int64) int64 {
	m.suspects.mu.Lock()
	since, ok := m.suspects.since[s]
	if !ok {
		since = now
		m.suspects.since[s] = now
		s.setFlag(flagSuspect)
	}
	m.suspects.mu.Unlock()
	if !ok && s.state() != stateLive {
		// It left the pool during the probe, and forgetLocal may already
		// have looked for it here.
		m.acquit(s)
	}
	return since
}

// acquit forgets that s was unresponsive: a probe answered, or s left the
// pool.
func (m *Manager) acquit(s *slot) {
	if !s.hasFlag(flagSuspect) {
		return
	}
	m.suspects.mu.Lock()
	delete(m.suspects.since, s)
	s.clearFlag(flagSuspect)
	m.suspects.mu.Unlock()
}

// condemn records a probe at now that found s unresponsive (probeErr) and,
// once s has been unresponsive for UnresponsiveAfter, kills it. It reports
// whether it did; if not, it returns the error for the caller: probeErr,
// carrying how long until s is condemned as its retry hint, or with the
// kill's failure if the kill was tried (the next Acquire tries again). A
// killed s is replaced by the caller like a sandbox gone, and announced
// as a Remove's sandboxes are: another instance may hold it, checked too
// recently to probe it before a memory hit hands it out.
func (m *Manager) condemn(ctx context.Context, s *slot, now int64, probeErr error) (bool, error) {
	since := m.suspect(s, now)
	switch due := since + int64(m.cfg.UnresponsiveAfter); {
	case m.cfg.UnresponsiveAfter < 0:
		return false, probeErr
	case now < due:
		return false, &RetryAfterError{Err: probeErr, RetryAfter: time.Duration(due - now)}
	}
	if err := m.killID(ctx, s.id, "unresponsive"); err != nil { // counted and logged
		return false, errors.Join(probeErr, err)
	}
	s.setFlag(flagKilled)
	m.ctr.unresponsive.Add(1)
	m.log.LogAttrs(ctx, slog.LevelWarn, "sandboxpool: unresponsive sandbox killed, to be replaced",
		slog.String("sandbox", s.id), slog.Duration("unresponsive_for", time.Duration(now-since)))
	if err := m.announceRemoval(ctx, s.key, []string{s.id}); err != nil {
		// Instances not told find it gone at their next probe.
		m.log.LogAttrs(ctx, slogWarn, "sandboxpool: announcing a condemned sandbox to other instances failed", slog.String("sandbox", s.id), attrErr(err))
	}
	return true, nil
}
