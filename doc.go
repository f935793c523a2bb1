// Package sandboxpool gives every (user, project) pair of a Go service its
// own cloud sandbox (an E2B microVM), reused across requests, shared safely
// by many instances of the service, and destroyed on time.
//
//	m, err := sandboxpool.New(sandboxpool.Config{Provider: p, Redis: rdb})
//	lease, err := m.Acquire(ctx, user, project)
//	defer lease.Release()
//	url := lease.Sandbox().EnvdURL()
//
// # Guarantees
//
//  1. One sandbox per pair. Concurrent Acquires of one pair, in one process
//     or (with Redis) across processes, create at most one sandbox. In a
//     process, one fill per pair runs at a time and every other caller
//     waits for it.
//  2. No leak. Memory held for a pair (pool entry, per-pair lock entry,
//     limiter state) is freed when the pair is gone; Stats().KeyLocks returns
//     to zero.
//  3. Aligned deadlines. An unleased pair's deadline is
//     min(lastUse+IdleTimeout, createdAt+MaxAge); the pool entry and the
//     provider's own timeout (and the Redis key) carry it, so if every
//     process dies the provider still reaps the sandbox on time. While a
//     lease is held the deadline is kept extended.
//  4. In use is alive. A leased sandbox is never reaped, and with Redis
//     the idle clock is shared, so use on any instance counts. A sandbox past
//     MaxAge is never handed out again. Memory-only, it is destroyed at its
//     last release; with Redis another instance may still hold a lease, so
//     no instance kills it: only a holder's keepalive extends its provider
//     deadline past MaxAge, by IdleTimeout/2 at a time, so the provider
//     reaps it within IdleTimeout/2 of its last release anywhere.
//  5. Fail closed. A cached sandbox is replaced only when the provider says
//     definitively that it is gone (ErrSandboxNotFound), or when the
//     provider has reported it running while it did not answer for
//     Config.UnresponsiveAfter (ErrSandboxUnresponsive): it is killed first,
//     and kept if the kill fails. With three or more unresponsive and no
//     probe answering since, the fault looks like the way to them, not the
//     sandboxes: one is replaced every UnresponsiveAfter, and the others
//     only once a probe answers (Stats().Spared). Timeouts, 5xx, 429 and
//     auth errors are returned to the caller and never cause a duplicate.
//  6. Probes have no side effects: a health check never extends a deadline.
//  7. Bad input is refused before any I/O: ids are 1–128 bytes of ASCII
//     letters, digits and ". _ - @ + =", starting with a letter or digit.
//  8. Secrets stay secret: Secret masks itself in every output form, and
//     the E2B client sends the API key and envd's tokens to no host but the
//     one a call names (it follows no redirect).
//  9. Degrades, then recovers. When Redis is unreachable a circuit breaker
//     opens; sandboxes in memory are still served, and new ones are created
//     without the cross-instance lock (counted in Stats().DegradedCreates) or
//     refused (Config.RefuseCreatesWhenDegraded). So are they when Redis
//     answers reads but has refused writes for RedisTimeout (out of memory,
//     say), with the breaker closed. A background probe closes
//     the breaker once Redis answers, publishes what was created meanwhile,
//     and makes the removals it could not announce (Close makes a last
//     try at both); once the removal subscription is confirmed again, every
//     pooled sandbox whose Redis record no longer names it is rechecked.
//     When E2B fails every call, the E2B client's retries stop once they
//     have spent a quota its calls share, so each call meets E2B once
//     (e2b.Options.RetryQuota).
//  10. Caller cancellation does not strand work: a create that has started
//     finishes within Config.CreateTimeout and is kept for the next caller.
//     A caller whose context has already ended starts nothing: Acquire
//     returns the context's error, even for a pooled pair.
//
// # The way through Acquire
//
// Look the pair up in a sharded in-memory index that a hit reads without a
// lock (a lease is one atomic add that also reads the slot's state): no I/O,
// a coarse clock, no allocation (Acquire is inlined, so a Lease that stays in
// the caller's function lives on its stack). Only validated pairs enter the
// pool, so a miss validates the ids before any I/O, then joins the pair's
// flight (a reference-counted per-pair entry) whose single fill probes,
// reconnects, adopts or creates outside every lock. The reaper pushes the
// provider deadline (and the Redis record's) of a used sandbox a quarter of
// IdleTimeout before it passes, so hot pairs cost no
// I/O on the request path.
//
// # Redis key layout
//
//	<ns>:{<user>:<project>}:sbx    the pair's sandbox record (hash: id, tpl, created, deadline),
//	                               expiring (PEXPIREAT) with the sandbox's deadline
//	<ns>:{<user>:<project>}:lock   the pair's create lock (redislock)
//	<ns>:live, <ns>:{<user>}:live  live pairs, scored by deadline (MaxSandboxes, MaxPerUser)
//	rate:<ns>:{<user>}:rate        the user's create rate limit (GCRA; redis_rate adds "rate:")
//	<ns>:removed                   Pub/Sub channel: "<user>:<project> <id>…", the sandboxes a Remove
//	                               or a condemnation killed, which every instance forgets at once
//
// The braces are a Redis Cluster hash tag: a pair's keys share a slot. Valid
// ids contain no ":", "{", "}", so the mapping from pair to key is injective
// (FuzzPairKey checks it).
//
// # Failure behaviour
//
// Provider errors are returned wrapped with the pair they concern; test them
// with errors.Is against the sentinels (ErrInvalidID, ErrClosed,
// ErrQuotaExceeded, ErrRateLimited, ErrUnavailable, ErrSandboxNotFound,
// ErrSandboxUnresponsive), and RetryAfter for a retry hint. Background failures
// (a failed kill or touch) are counted in Stats and logged through
// Config.Logger, and retried on the next reaper tick; the provider deadline
// bounds what a failure can leak.
package sandboxpool
