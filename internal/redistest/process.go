package redistest

import (
	"os"
	"syscall"
	"testing"
	"time"
)

// Process is the running redis-server process, or nil when it is stopped
// or killed: for tests that signal it themselves.
func (s *Server) Process() *os.Process {
	if s.cmd == nil {
		return nil
	}
	return s.cmd.Process
}

// Terminate stops the server with SIGTERM, as a service manager does:
// redis-server flushes its append-only file and exits. It waits up to 30 s
// for the exit (then kills it) and returns how long the shutdown took.
// Start it again with Revive.
func (s *Server) Terminate(tb testing.TB) time.Duration {
	tb.Helper()
	if s.cmd == nil || s.cmd.Process == nil {
		tb.Fatal("redistest: terminate: not running")
	}
	start := time.Now()
	if !s.signalAndWait(syscall.SIGTERM, 30*time.Second) {
		tb.Errorf("redistest: redis-server did not exit within 30 s of SIGTERM; killed it")
	}
	return time.Since(start)
}
