// Package redistest starts a private redis-server for a test: a free port, a
// temporary folder, stopped when the test ends. Tests never share the Redis
// that may already run on the machine.
package redistest

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Server is one running redis-server.
type Server struct {
	Addr string // host:port
	URL  string // redis://host:port/0
	Dir  string // its data folder (AOF lives here)
	cmd  *exec.Cmd
	args []string // extra redis-server arguments, kept for Revive
}

// Start starts redis-server on a free port with its data in tb.TempDir() and
// stops it when the test ends. AOF is on (appendfsync everysec) so tests can
// restart it and find their data. The test fails if redis-server is missing:
// install it (Debian: apt-get install redis-server); .ci/run does.
func Start(tb testing.TB) *Server {
	tb.Helper()
	return StartArgs(tb)
}

// StartArgs is Start with extra redis-server arguments, given after sluice's
// defaults so that they win: StartArgs(tb, "--maxmemory-policy",
// "allkeys-lru") or StartArgs(tb, "--rename-command", "CONFIG", "").
// Restart and Revive keep them.
func StartArgs(tb testing.TB, args ...string) *Server {
	tb.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		tb.Fatalf("redistest: redis-server not found on PATH (apt-get install redis-server): %v", err)
	}
	dir := tb.TempDir()
	var lastErr error
	for try := 0; try < 5; try++ {
		port, err := freePort()
		if err != nil {
			tb.Fatalf("redistest: %v", err)
		}
		s := &Server{Addr: fmt.Sprintf("127.0.0.1:%d", port), Dir: dir, args: args}
		s.URL = "redis://" + s.Addr + "/0"
		if lastErr = s.start(bin, port); lastErr == nil {
			tb.Cleanup(s.Stop)
			return s
		}
	}
	tb.Fatalf("redistest: could not start redis-server: %v", lastErr)
	return nil
}

func (s *Server) start(bin string, port int) error {
	cmd := exec.Command(bin, append([]string{
		"--port", fmt.Sprint(port),
		"--bind", "127.0.0.1",
		"--dir", s.Dir,
		"--save", "",
		"--appendonly", "yes",
		"--appendfsync", "everysec",
		"--maxmemory-policy", "noeviction",
		"--daemonize", "no",
		"--loglevel", "warning",
	}, s.args...)...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		return err
	}
	s.cmd = cmd
	// Drain its output so it never blocks on a full pipe; keep the tail for errors.
	tail := make(chan string, 1)
	go func() {
		var last []string
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			last = append(last, sc.Text())
			if len(last) > 20 {
				last = last[1:]
			}
		}
		tail <- strings.Join(last, "\n")
	}()
	if answers(s.Addr, 10*time.Second, cmd) == nil {
		return nil
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	return fmt.Errorf("redis-server on port %d did not answer: %s", port, <-tail)
}

// Client returns a go-redis client for this server, closed when the test ends.
func (s *Server) Client(tb testing.TB) *redis.Client {
	tb.Helper()
	c := redis.NewClient(&redis.Options{Addr: s.Addr})
	tb.Cleanup(func() { _ = c.Close() })
	return c
}

// Stop stops the server (SIGTERM, then waits). Safe to call twice.
func (s *Server) Stop() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	s.signalAndWait(os.Interrupt, 10*time.Second)
}

// signalAndWait sends sig and waits up to grace for the server to exit,
// then kills it; it reports whether it exited by itself.
func (s *Server) signalAndWait(sig os.Signal, grace time.Duration) bool {
	_ = s.cmd.Process.Signal(sig)
	done := make(chan struct{})
	go func() { _ = s.cmd.Wait(); close(done) }()
	clean := true
	select {
	case <-done:
	case <-time.After(grace):
		_ = s.cmd.Process.Kill()
		<-done
		clean = false
	}
	s.cmd = nil
	return clean
}

// Restart stops the server and starts it again on the same port and folder;
// with AOF on, written data survives.
func (s *Server) Restart(tb testing.TB) {
	tb.Helper()
	s.Stop()
	s.Revive(tb)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Path is where redis-server keeps its append-only files.
func (s *Server) Path() string { return filepath.Join(s.Dir, "appendonlydir") }

// Kill stops the server at once (SIGKILL), as a crash would: what it had
// written to its append-only file survives, what it held only in memory is
// gone. Start it again with Revive.
func (s *Server) Kill(tb testing.TB) {
	tb.Helper()
	if s.cmd == nil || s.cmd.Process == nil {
		tb.Fatal("redistest: kill: not running")
	}
	_ = s.cmd.Process.Kill()
	_ = s.cmd.Wait()
	s.cmd = nil
}

// Revive starts a killed or stopped server again on its port and folder.
func (s *Server) Revive(tb testing.TB) {
	tb.Helper()
	bin, _ := exec.LookPath("redis-server")
	_, portStr, _ := net.SplitHostPort(s.Addr)
	var port int
	fmt.Sscan(portStr, &port)
	if err := s.start(bin, port); err != nil {
		tb.Fatalf("redistest: revive: %v", err)
	}
}

// Pause freezes the server (SIGSTOP): connections stay open and commands
// hang, as with a Redis host that stalls. Resume lets it go on.
func (s *Server) Pause(tb testing.TB) {
	tb.Helper()
	if err := s.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		tb.Fatalf("redistest: pause: %v", err)
	}
}

// Resume continues a paused server (SIGCONT).
func (s *Server) Resume(tb testing.TB) {
	tb.Helper()
	if err := s.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		tb.Fatalf("redistest: resume: %v", err)
	}
}
