package sandboxpool

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// removedChannel is the Redis Pub/Sub channel on which a Remove names the
// sandboxes it killed, so that every instance forgets them at once instead
// of handing them out from memory until its next probe.
func (st *store) removedChannel() string { return st.ns + ":removed" }

// announceRemoval publishes removalMessage(k, ids) on removedChannel. If
// Redis gives no answer (it is down, stalled or cut off from this
// instance, or ctx ended first), the removal is kept and made once Redis
// answers again (see flushRemovals).
func (m *Manager) announceRemoval(ctx context.Context, k pairKey, ids []string) error {
	if m.store == nil || len(ids) == 0 {
		return nil
	}
	err := m.publishRemoval(ctx, removal{k, ids})
	if err != nil && !answered(err) {
		m.keepRemoval(removal{k, ids})
	}
	return err
}

func (m *Manager) publishRemoval(ctx context.Context, r removal) error {
	msg := removalMessage(r.k, r.ids)
	return m.store.do(ctx, func(ctx context.Context) error { return m.store.rdb.Publish(ctx, m.store.removedChannel(), msg).Err() })
}

// removal is a pair's sandboxes killed by a Remove or a condemnation.
type removal struct {
	k   pairKey
	ids []string
}

// maxUnannounced bounds the removals kept while Redis does not answer
// (about 200 bytes each): past it the oldest are dropped, and the
// instances that hold those sandboxes find them gone at their next probe,
// as they would with no announcement at all.
const maxUnannounced = 1024

// unannounced are removals whose announcement Redis did not answer, oldest
// first.
type unannounced struct {
	mu       sync.Mutex
	q        []removal
	flushing int // taken from q by flushRemovals and not made yet
}

// keepRemoval keeps r for flushRemovals, with its own copy of the ids (a
// caller's may share a larger string, such as a request's body).
func (m *Manager) keepRemoval(r removal) {
	r.k = r.k.clone()
	m.unannounced.mu.Lock()
	defer m.unannounced.mu.Unlock()
	if len(m.unannounced.q) >= maxUnannounced {
		m.unannounced.q = slices.Delete(m.unannounced.q, 0, 1)
	}
	m.unannounced.q = append(m.unannounced.q, r)
}

// unannouncedCount is how many removals wait to be made: kept for
// flushRemovals, or taken by it and not made yet.
func (m *Manager) unannouncedCount() int {
	m.unannounced.mu.Lock()
	defer m.unannounced.mu.Unlock()
	return len(m.unannounced.q) + m.unannounced.flushing
}

// flushRemovals makes the removals Redis did not answer, once it answers
// again (probeLoop): it deletes the record of each sandbox killed if it
// still names it (a Remove cut off from Redis could not), with its quota
// place, then announces the removal, so that the other instances forget
// the sandboxes at once instead of at their next probe. Late is harmless:
// a killed sandbox's id never names a live one. A removal Redis refuses
// (see answered) is dropped: trying it again would not help. Otherwise
// flushRemovals stops at the first failure, keeps what is left for the
// next try, and reports false.
func (m *Manager) flushRemovals(ctx context.Context) bool {
	m.unannounced.mu.Lock()
	q := m.unannounced.q
	m.unannounced.q = nil
	m.unannounced.flushing += len(q)
	m.unannounced.mu.Unlock()
	for i, r := range q {
		err := m.makeRemoval(ctx, r)
		switch {
		case err == nil:
		case answered(err):
			m.log.LogAttrs(ctx, slogWarn, "sandboxpool: Redis refused a removal kept for it; dropped", slog.String("pair", pairMember(r.k)), attrErr(err))
		default:
			m.unannounced.mu.Lock()
			m.unannounced.q = append(q[i:], m.unannounced.q...)
			m.unannounced.flushing -= len(q) - i
			if n := len(m.unannounced.q); n > maxUnannounced {
				m.unannounced.q = m.unannounced.q[n-maxUnannounced:]
			}
			m.unannounced.mu.Unlock()
			return false
		}
		m.unannounced.mu.Lock()
		m.unannounced.flushing--
		m.unannounced.mu.Unlock()
	}
	return true
}

// makeRemoval deletes r's records and announces r.
func (m *Manager) makeRemoval(ctx context.Context, r removal) error {
	for _, id := range r.ids {
		deleted, err := m.store.compareDelete(ctx, r.k, id)
		if err != nil {
			return err
		}
		if deleted {
			if err := m.store.unreserve(ctx, r.k); err != nil {
				return err
			}
		}
	}
	return m.publishRemoval(ctx, r)
}

// removalMessage is "<user>:<project> <id> <id>…": valid ids hold no ':'
// and no space, and sandbox ids no space, so it parses back exactly.
func removalMessage(k pairKey, ids []string) string {
	return pairMember(k) + " " + strings.Join(ids, " ")
}

// parseRemoval reads a removalMessage; ok is false for anything else
// (another program publishing on the channel).
func parseRemoval(msg string) (k pairKey, ids []string, ok bool) {
	f := strings.Fields(msg)
	if len(f) < 2 {
		return pairKey{}, nil, false
	}
	user, project, found := strings.Cut(f[0], ":")
	if !found || ValidateIDs(user, project) != nil {
		return pairKey{}, nil, false
	}
	return pairKey{user, project}, f[1:], true
}

// The removal subscriber's bounds. go-redis's own subscription channel
// (PubSub.Channel) redials with no deadline, so against a stalled Redis its
// handshake waits out the client's whole ReadTimeout (or for ever), and
// Close with it; the subscriber therefore waits with deadlines of its own.
const (
	// removalPoll bounds each wait: for a message, or for a (re)connection
	// and its SUBSCRIBE.
	removalPoll = time.Second
	// removalPingAfter is how long the subscription may stay quiet before
	// the subscriber pings on it, so that a dead connection is found (see
	// removalLoop), as go-redis's channel health check does.
	removalPingAfter = 3 * time.Second
	// removalRetry is the pause after a receive that failed at once (Redis
	// refusing connections while it restarts): no busy loop.
	removalRetry = 100 * time.Millisecond
)

// removalLoop forgets the sandboxes other instances' Removes (and
// condemnations of unresponsive sandboxes) announce, until Close.
//
// A subscription can be lost: Redis restarts, or the connection dies
// without a word (a partition, a NAT or load balancer that dropped the
// flow, a Redis host gone without a reset), where writes still succeed
// into the socket's buffer and nothing ever comes back. So the subscriber
// pings a subscription quiet for removalPingAfter, and one whose ping gets
// no answer within RedisTimeout is replaced by a new subscription on a new
// connection. Announcements made while it was lost never arrive: whenever
// Redis confirms a subscription again (after go-redis redialled, or after
// a replacement), the pool is compared with Redis, and every pooled
// sandbox whose record no longer names it is rechecked (recheckPooled), so
// one another instance removed meanwhile is found gone at its pair's next
// Acquire instead of being handed out until its next probe is due.
//
// A subscription Redis refuses (an ACL without SUBSCRIBE) is given up at
// once, with one warning: nothing would ever arrive on it. One refused for
// a while (BUSY while a script runs), which go-redis's redial leaves
// subscribed to nothing, is replaced until Redis takes it.
func (m *Manager) removalLoop() {
	ctx, cancel := context.WithTimeout(m.baseCtx, m.cfg.RedisTimeout)
	sub := &subscriber{ps: m.store.rdb.Subscribe(ctx, m.store.removedChannel())}
	_, err := sub.ps.Receive(ctx) // the confirmation, or the refusal
	cancel()
	if answered(err) {
		m.giveUpRemovals(sub, err)
		return
	}
	// Close ends a wait at once: closing the subscription fails its
	// blocked read.
	closed := make(chan struct{})
	go func() {
		defer close(closed)
		<-m.done
		sub.close()
	}()
	defer func() { <-closed }()
	var pinged time.Time // the unanswered ping, if any
	for heard := time.Now(); ; {
		ps := sub.current()
		ctx, cancel := context.WithTimeout(m.baseCtx, removalPoll)
		msg, err := ps.ReceiveTimeout(ctx, removalPoll)
		cancel()
		select {
		case <-m.done:
			return
		default:
		}
		switch {
		case err == nil:
			heard, pinged = time.Now(), time.Time{}
			switch msg := msg.(type) {
			case *redis.Message:
				if k, ids, ok := parseRemoval(msg.Payload); ok {
					m.dropRemoved(k, ids)
				}
			case *redis.Subscription:
				if msg.Kind == "subscribe" { // subscribed again: announcements may have been missed
					m.recheckPooled()
				}
			}
		case timedOut(err) && !pinged.IsZero():
			if time.Since(pinged) >= m.cfg.RedisTimeout { // the connection is dead
				sub.renew(m.baseCtx, m.store.rdb, m.store.removedChannel(), m.cfg.RedisTimeout)
				heard, pinged = time.Now(), time.Time{}
			}
		case timedOut(err):
			if time.Since(heard) >= m.cfg.removalPingAfter {
				ctx, cancel := context.WithTimeout(m.baseCtx, m.cfg.RedisTimeout)
				if err := ps.Ping(ctx); err == nil { // its answer arrives as a message
					pinged = time.Now()
				} else { // go-redis redialled, and the new subscription is confirmed, or it could not
					m.store.nodeLost(m.baseCtx, err)
				}
				cancel()
				heard = time.Now()
			}
		case answered(err): // refused for good, as at the start
			m.giveUpRemovals(sub, err)
			return
		case isRedisError(err):
			// Redis refused a command on the subscription's connection,
			// which stays up and answers pings: after go-redis redialled,
			// the SUBSCRIBE it sent again was refused (a Redis busy with a
			// script, say), and the connection is subscribed to nothing.
			// Subscribe again, on a new connection.
			if !pause(m.baseCtx, removalRetry) {
				return
			}
			sub.renew(m.baseCtx, m.store.rdb, m.store.removedChannel(), m.cfg.RedisTimeout)
			heard, pinged = time.Now(), time.Time{}
		default: // the connection failed: go-redis redials on the next receive
			m.store.nodeLost(m.baseCtx, err) // on the channel's master, which may have failed over
			pinged = time.Time{}
			if !pause(m.baseCtx, removalRetry) {
				return
			}
		}
	}
}

// giveUpRemovals closes a subscription Redis refused for good (err), which
// nothing will read any more, and warns once.
func (m *Manager) giveUpRemovals(sub *subscriber, err error) {
	sub.close()
	m.log.LogAttrs(m.baseCtx, slogWarn, "sandboxpool: cannot subscribe to other instances' removals; they reach this one at its next probe", attrErr(err))
}

// subscriber holds the removal subscription, which removalLoop may
// replace while Close may close it.
type subscriber struct {
	mu     sync.Mutex
	ps     *redis.PubSub
	closed bool
}

func (s *subscriber) current() *redis.PubSub {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ps
}

// renew replaces the subscription with a new one, on a new connection,
// and closes the old one. Its SUBSCRIBE is sent within timeout; if it
// fails, the next receive redials, and Redis's confirmation arrives as a
// message either way.
func (s *subscriber) renew(ctx context.Context, rdb redis.UniversalClient, channel string, timeout time.Duration) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	ps := rdb.Subscribe(ctx, channel)
	s.mu.Lock()
	if !s.closed {
		ps, s.ps = s.ps, ps
	}
	s.mu.Unlock()
	_ = ps.Close() // the old one, or the new one when Close came first
}

func (s *subscriber) close() {
	s.mu.Lock()
	s.closed = true
	ps := s.ps
	s.mu.Unlock()
	_ = ps.Close()
}

// recheckBatch is how many records one pipeline reads when the pool is
// compared with Redis (recheckPooled): a million pooled pairs take 2,000
// round trips, and one pipeline stays far within RedisTimeout.
const recheckBatch = 512

// recheckPooled runs when Redis confirms the removal subscription after a
// time without one, when a removal announced meanwhile may have been
// missed. A removal deletes the pair's record (a condemnation, or a
// replacement, makes it name another sandbox), so in the background it
// compares each pooled sandbox with the pair's record, and makes the next
// Acquire of each pair whose record no longer names its sandbox probe it
// (see Lease.Recheck). After a Redis that lost its data, that is every
// pooled pair: at most one probe each, what HealthCheckAfter costs anyway.
// Where Redis fails the read, the pairs are rechecked too.
func (m *Manager) recheckPooled() {
	m.ctr.resubscribed.Add(1)
	var slots []*slot
	m.pool.each(func(s *slot) { slots = append(slots, s) })
	m.goBackground(func() {
		pooled, rechecked := len(slots), 0
		keys := make([]pairKey, 0, recheckBatch)
		for len(slots) > 0 && !m.closed.Load() {
			batch := slots[:min(len(slots), recheckBatch)]
			slots = slots[len(batch):]
			keys = keys[:0]
			for _, s := range batch {
				keys = append(keys, s.key)
			}
			ids, err := m.store.recordIDs(m.baseCtx, keys)
			for i, s := range batch {
				if err != nil || ids[i] != s.id {
					m.recheck(s)
					rechecked++
				}
			}
		}
		m.log.LogAttrs(m.baseCtx, slog.LevelInfo, "sandboxpool: subscribed to other instances' removals again; the pooled sandboxes Redis no longer names are checked at their next Acquire",
			slog.Int("pooled", pooled), slog.Int("rechecked", rechecked))
	})
}

// timedOut reports whether err is a wait that ran out of time.
func timedOut(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout()
}

// isRedisError reports whether err is an error reply from Redis: it
// refused a command, and the connection is still up.
func isRedisError(err error) bool {
	var re redis.Error
	return errors.As(err, &re)
}
