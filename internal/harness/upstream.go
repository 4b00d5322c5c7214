package harness

import (
	"errors"
	"net"
	"net/http"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Upstream serves a handler (the fake upstream) over real HTTP on a fixed
// loopback address, and can go down (the listener closed and every
// connection cut, as when the upstream's process dies or the network
// fails) and come back on the same address.
type Upstream struct {
	URL  string
	addr string
	h    http.Handler
	mu   sync.Mutex
	srv  *http.Server
}

// StartUpstream serves h until the test ends.
func StartUpstream(tb testing.TB, h http.Handler) *Upstream {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	u := &Upstream{addr: ln.Addr().String(), h: h}
	u.URL = "http://" + u.addr
	u.serve(ln)
	tb.Cleanup(u.Down)
	return u
}

func (u *Upstream) serve(ln net.Listener) {
	srv := &http.Server{Handler: u.h, ReadHeaderTimeout: 10 * time.Second}
	u.mu.Lock()
	u.srv = srv
	u.mu.Unlock()
	go func() { _ = srv.Serve(ln) }()
}

// Down closes the listener and every open connection: new calls are
// refused, calls in flight break. Safe to call twice.
func (u *Upstream) Down() {
	u.mu.Lock()
	srv := u.srv
	u.srv = nil
	u.mu.Unlock()
	if srv != nil {
		_ = srv.Close()
	}
}

// Up listens on the same address again.
func (u *Upstream) Up(tb testing.TB) {
	tb.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ln, err := net.Listen("tcp", u.addr)
		if err == nil {
			u.serve(ln)
			return
		}
		if !errors.Is(err, syscall.EADDRINUSE) || time.Now().After(deadline) {
			tb.Fatalf("upstream: listen again on %s: %v", u.addr, err)
		}
		time.Sleep(20 * time.Millisecond) // the port is released by the kernel, not by a signal we can wait on
	}
}
