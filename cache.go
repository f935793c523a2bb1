package sandboxpool

import "context"

// fromCache finds the pair's sandbox in Redis and reconnects to it.
// Memory-only managers have no cache.
func (m *Manager) fromCache(ctx context.Context, sh *shard, k pairKey) (*slot, error) {
	return nil, nil
}

// uncache deletes the pair's Redis entry whatever sandbox it names.
func (m *Manager) uncache(ctx context.Context, k pairKey) error { return nil }

// uncacheSlot deletes the pair's Redis entry if it still names s's sandbox.
func (m *Manager) uncacheSlot(ctx context.Context, s *slot) {}

// cacheTouch extends the pair's Redis expiry and idle clock to deadline.
func (m *Manager) cacheTouch(ctx context.Context, s *slot, deadline int64) {}

// remoteDeadline returns the deadline another instance set in Redis, or 0.
func (m *Manager) remoteDeadline(ctx context.Context, s *slot) int64 { return 0 }

func (m *Manager) redisStats(st *Stats) {}
