// Package fakeprovider is an in-memory sandboxpool.Provider for the pool's
// own tests: it counts calls, expires sandboxes at their deadline on an
// injectable clock, and injects errors and latency per operation.
package fakeprovider

import (
	"context"
	"fmt"
	"maps"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sandboxpool/sandboxpool"
)

// Op names a Provider method, for counters and fault injection.
type Op string

// The Provider operations.
const (
	OpCreate     Op = "create"
	OpConnect    Op = "connect"
	OpCheck      Op = "check"
	OpSetTimeout Op = "settimeout"
	OpKill       Op = "kill"
	OpList       Op = "list"
)

type box struct {
	sb       sandboxpool.Sandbox
	deadline time.Time
	hung     bool // alive, but its Check answers ErrSandboxUnresponsive
}

// Provider is the fake. The zero value is not usable; call New.
type Provider struct {
	// Now is the provider's clock; sandboxes past their deadline are gone.
	Now func() time.Time

	mu      sync.Mutex
	boxes   map[string]*box
	byPair  map[string]map[string]struct{} // pair index for List, so large pools stay cheap
	nextID  int
	errs    map[Op][]error // queued one-shot errors, consumed in order
	sticky  map[Op]error   // returned on every call until cleared
	latency map[Op]time.Duration
	calls   map[Op]*atomic.Int64
	killed  []string
}

// New returns an empty fake using time.Now.
func New() *Provider {
	p := &Provider{Now: time.Now, boxes: map[string]*box{}, byPair: map[string]map[string]struct{}{}, errs: map[Op][]error{},
		sticky: map[Op]error{}, latency: map[Op]time.Duration{}, calls: map[Op]*atomic.Int64{}}
	for _, op := range []Op{OpCreate, OpConnect, OpCheck, OpSetTimeout, OpKill, OpList} {
		p.calls[op] = new(atomic.Int64)
	}
	return p
}

// Calls returns how many times op was called (failed calls included).
func (p *Provider) Calls(op Op) int64 { return p.calls[op].Load() }

// FailNext makes the next calls of op return errs, one each, in order.
func (p *Provider) FailNext(op Op, errs ...error) {
	p.mu.Lock()
	p.errs[op] = append(p.errs[op], errs...)
	p.mu.Unlock()
}

// FailAlways makes every call of op return err until called with nil.
func (p *Provider) FailAlways(op Op, err error) {
	p.mu.Lock()
	p.sticky[op] = err
	p.mu.Unlock()
}

// SetLatency delays every call of op by d (honouring the call's context).
func (p *Provider) SetLatency(op Op, d time.Duration) {
	p.mu.Lock()
	p.latency[op] = d
	p.mu.Unlock()
}

// Alive returns the ids of sandboxes that exist now.
func (p *Provider) Alive() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	ids := make([]string, 0, len(p.boxes))
	for id := range p.boxes {
		if p.getLocked(id) != nil {
			ids = append(ids, id)
		}
	}
	return ids
}

// Deadline returns a sandbox's deadline, and whether it exists.
func (p *Provider) Deadline(id string) (time.Time, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	b := p.getLocked(id)
	if b == nil {
		return time.Time{}, false
	}
	return b.deadline, true
}

// Vanish deletes a sandbox behind the pool's back (as E2B does on a crash).
func (p *Provider) Vanish(id string) {
	p.mu.Lock()
	p.deleteLocked(id)
	p.mu.Unlock()
}

// Hang makes a sandbox unresponsive: it stays alive (Connect, SetTimeout
// and List see it) while its Check answers ErrSandboxUnresponsive, as a
// sandbox whose VM hung does. Revive undoes it.
func (p *Provider) Hang(id string) { p.setHung(id, true) }

// Revive makes a hung sandbox answer its Check again.
func (p *Provider) Revive(id string) { p.setHung(id, false) }

func (p *Provider) setHung(id string, hung bool) {
	p.mu.Lock()
	if b := p.getLocked(id); b != nil {
		b.hung = hung
	}
	p.mu.Unlock()
}

// Killed returns the ids passed to successful Kill calls of live sandboxes.
func (p *Provider) Killed() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.killed...)
}

// getLocked returns a live sandbox, deleting it if its deadline has passed.
func (p *Provider) getLocked(id string) *box {
	b := p.boxes[id]
	if b != nil && !p.Now().Before(b.deadline) {
		p.deleteLocked(id)
		return nil
	}
	return b
}

func pairOf(md map[string]string) string {
	return md[sandboxpool.MetaNamespace] + "\x00" + md[sandboxpool.MetaUser] + "\x00" + md[sandboxpool.MetaProject]
}

func (p *Provider) deleteLocked(id string) {
	b := p.boxes[id]
	if b == nil {
		return
	}
	delete(p.boxes, id)
	pk := pairOf(b.sb.Metadata)
	delete(p.byPair[pk], id)
	if len(p.byPair[pk]) == 0 {
		delete(p.byPair, pk)
	}
}

// enter counts the call, applies latency and returns an injected error.
func (p *Provider) enter(ctx context.Context, op Op) error {
	p.calls[op].Add(1)
	p.mu.Lock()
	d := p.latency[op]
	var err error
	if q := p.errs[op]; len(q) > 0 {
		err, p.errs[op] = q[0], q[1:]
	} else {
		err = p.sticky[op]
	}
	p.mu.Unlock()
	if d > 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if err == nil {
		err = ctx.Err()
	}
	return err
}

func notFound(id string) error {
	return fmt.Errorf("fake: sandbox %q: %w", id, sandboxpool.ErrSandboxNotFound)
}

// Create implements sandboxpool.Provider.
func (p *Provider) Create(ctx context.Context, req sandboxpool.CreateRequest) (sandboxpool.Sandbox, error) {
	if err := p.enter(ctx, OpCreate); err != nil {
		return sandboxpool.Sandbox{}, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.nextID++
	now := p.Now()
	sb := sandboxpool.Sandbox{ID: fmt.Sprintf("i%020d", p.nextID), Template: req.Template, Domain: "fake.local",
		EnvdVersion: "0.6.4", AccessToken: sandboxpool.NewSecret(fmt.Sprint("tok_", p.nextID)), Metadata: maps.Clone(req.Metadata), CreatedAt: now}
	p.boxes[sb.ID] = &box{sb: sb, deadline: now.Add(req.Timeout)}
	pk := pairOf(sb.Metadata)
	if p.byPair[pk] == nil {
		p.byPair[pk] = map[string]struct{}{}
	}
	p.byPair[pk][sb.ID] = struct{}{}
	return sb, nil
}

// Connect implements sandboxpool.Provider: it extends, never shortens.
func (p *Provider) Connect(ctx context.Context, id string, timeout time.Duration) (sandboxpool.Sandbox, error) {
	if err := p.enter(ctx, OpConnect); err != nil {
		return sandboxpool.Sandbox{}, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	b := p.getLocked(id)
	if b == nil {
		return sandboxpool.Sandbox{}, notFound(id)
	}
	if d := p.Now().Add(timeout); d.After(b.deadline) {
		b.deadline = d
	}
	return b.sb, nil
}

// Check implements sandboxpool.Provider without touching the deadline.
func (p *Provider) Check(ctx context.Context, sb sandboxpool.Sandbox) error {
	if err := p.enter(ctx, OpCheck); err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	switch b := p.getLocked(sb.ID); {
	case b == nil:
		return notFound(sb.ID)
	case b.hung:
		return fmt.Errorf("fake: sandbox %q does not answer: %w", sb.ID, sandboxpool.ErrSandboxUnresponsive)
	}
	return nil
}

// SetTimeout implements sandboxpool.Provider (it may shorten, as E2B's does).
func (p *Provider) SetTimeout(ctx context.Context, id string, timeout time.Duration) error {
	if err := p.enter(ctx, OpSetTimeout); err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	b := p.getLocked(id)
	if b == nil {
		return notFound(id)
	}
	b.deadline = p.Now().Add(timeout)
	return nil
}

// Kill implements sandboxpool.Provider; killing a missing sandbox is nil.
func (p *Provider) Kill(ctx context.Context, id string) error {
	if err := p.enter(ctx, OpKill); err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.getLocked(id) != nil {
		p.deleteLocked(id)
		p.killed = append(p.killed, id)
	}
	return nil
}

// List implements sandboxpool.Provider.
func (p *Provider) List(ctx context.Context, metadata map[string]string) ([]sandboxpool.Sandbox, error) {
	if err := p.enter(ctx, OpList); err != nil {
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []sandboxpool.Sandbox
	candidates := p.boxes
	if _, ok := metadata[sandboxpool.MetaUser]; ok {
		candidates = map[string]*box{}
		for id := range p.byPair[pairOf(metadata)] {
			candidates[id] = p.boxes[id]
		}
	}
next:
	for id, b := range candidates {
		if p.getLocked(id) == nil {
			continue
		}
		for k, v := range metadata {
			if b.sb.Metadata[k] != v {
				continue next
			}
		}
		out = append(out, b.sb)
	}
	return out, nil
}
