package redistest

import (
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Link is a loopback TCP proxy to a Redis, standing for the network between
// one client and it. It can delay every write from a client before passing
// it on (a link with that much round-trip time, as to a Redis in another
// zone), and it can be cut and healed: a partition. It is closed at test
// end, with every connection through it.
type Link struct {
	Addr string // what clients dial

	delay  time.Duration
	ln     net.Listener
	done   chan struct{} // closed by close: ends every wait on a cut
	mu     sync.Mutex
	conns  []*proxied
	cut    chan struct{} // non-nil while cut; closed by Heal
	closed bool
	wg     sync.WaitGroup
}

// proxied is one client connection through the link and its connection
// to Redis.
type proxied struct {
	c, s net.Conn
	dead atomic.Bool // cut: passes nothing any more, and is never closed
}

// StartLink proxies to target with delay added to each client write.
func StartLink(t testing.TB, target string, delay time.Duration) *Link {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("link: %v", err)
	}
	l := &Link{Addr: ln.Addr().String(), delay: delay, ln: ln, done: make(chan struct{})}
	l.wg.Add(1)
	go l.accept(target)
	t.Cleanup(l.close)
	return l
}

// Cut partitions the link, and leaves every connection open through it
// half-open, as a partition long enough for TCP to give up would, or a NAT
// or load balancer that dropped its flows, or a Redis host that died
// without a reset: those connections lose everything sent on them from now
// on, for good, and are never closed, so that only the client's own
// timeouts and health checks can find them dead. Connections made while
// the link is cut are accepted, and what is sent on them is held until
// Heal.
func (l *Link) Cut() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, p := range l.conns {
		p.dead.Store(true)
	}
	if l.cut == nil {
		l.cut = make(chan struct{})
	}
}

// Heal ends a Cut: connections made since pass what they held, and new
// ones pass at once. Connections cut stay dead.
func (l *Link) Heal() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cut != nil {
		close(l.cut)
		l.cut = nil
	}
}

// pass waits while the link is cut; it reports false once the link closes.
func (l *Link) pass() bool {
	l.mu.Lock()
	cut := l.cut
	l.mu.Unlock()
	if cut == nil {
		return true
	}
	select {
	case <-cut:
		return true
	case <-l.done:
		return false
	}
}

func (l *Link) accept(target string) {
	defer l.wg.Done()
	for {
		c, err := l.ln.Accept()
		if err != nil {
			return // closed
		}
		s, err := net.Dial("tcp", target)
		if err != nil {
			_ = c.Close()
			continue
		}
		p := &proxied{c: c, s: s}
		if !l.track(p) {
			return
		}
		l.wg.Add(2)
		go l.pipe(p, c, s, 0)       // answers pass at once
		go l.pipe(p, s, c, l.delay) // requests wait the delay
	}
}

// pipe copies p's traffic from src to dst, each chunk after delay and
// only while the link is not cut, and closes dst when src ends (or dst
// fails). Once p is dead it discards what it reads, and closes nothing:
// the other end must not learn that this end closed.
func (l *Link) pipe(p *proxied, dst, src net.Conn, delay time.Duration) {
	defer l.wg.Done()
	defer func() {
		if !p.dead.Load() {
			_ = dst.Close()
		}
	}()
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !p.dead.Load() {
			time.Sleep(delay)
			if !l.pass() {
				return
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// track records p, or closes it and reports false once the link is closed.
func (l *Link) track(p *proxied) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		_, _ = p.c.Close(), p.s.Close()
		return false
	}
	l.conns = append(l.conns, p)
	return true
}

func (l *Link) close() {
	_ = l.ln.Close()
	l.mu.Lock()
	l.closed = true
	close(l.done)
	for _, p := range l.conns {
		_, _ = p.c.Close(), p.s.Close()
	}
	l.mu.Unlock()
	l.wg.Wait()
}
