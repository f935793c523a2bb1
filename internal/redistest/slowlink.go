package redistest

import (
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// SlowLink is a loopback TCP proxy to a Redis that delays every write from
// a client before passing it on: a link with that much round-trip time, as
// to a Redis in another zone. It is closed at test end, with every
// connection through it.
type SlowLink struct {
	Addr string // what clients dial

	delay  time.Duration
	ln     net.Listener
	mu     sync.Mutex
	conns  []net.Conn
	closed bool
	wg     sync.WaitGroup
}

// StartSlowLink proxies to target with delay added to each client write.
func StartSlowLink(t testing.TB, target string, delay time.Duration) *SlowLink {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("slow link: %v", err)
	}
	l := &SlowLink{Addr: ln.Addr().String(), delay: delay, ln: ln}
	l.wg.Add(1)
	go l.accept(target)
	t.Cleanup(l.close)
	return l
}

func (l *SlowLink) accept(target string) {
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
		if !l.track(c, s) {
			return
		}
		l.wg.Add(2)
		go func() { // answers pass at once
			defer l.wg.Done()
			_, _ = io.Copy(c, s)
			_ = c.Close()
		}()
		go func() { // requests wait the delay
			defer l.wg.Done()
			defer s.Close()
			buf := make([]byte, 64<<10)
			for {
				n, err := c.Read(buf)
				if n > 0 {
					time.Sleep(l.delay)
					if _, werr := s.Write(buf[:n]); werr != nil {
						return
					}
				}
				if err != nil {
					return
				}
			}
		}()
	}
}

// track records a proxied pair of connections, or closes them and reports
// false once the link is closed.
func (l *SlowLink) track(c, s net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		_, _ = c.Close(), s.Close()
		return false
	}
	l.conns = append(l.conns, c, s)
	return true
}

func (l *SlowLink) close() {
	_ = l.ln.Close()
	l.mu.Lock()
	l.closed = true
	for _, c := range l.conns {
		_ = c.Close()
	}
	l.mu.Unlock()
	l.wg.Wait()
}
