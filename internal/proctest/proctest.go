// Package proctest runs programs as real OS processes for tests: it builds a
// Go binary once per test binary, starts processes with their output
// captured (and copied to a file if asked), reads the address a process logs
// once it listens, and stops, kills, pauses and resumes them. A process still
// running when its test ends is stopped (SIGTERM, then SIGKILL).
package proctest

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// SluicePackage is the import path of the sluice command.
const SluicePackage = "github.com/sluice-dev/sluice/cmd/sluice"

var (
	buildMu  sync.Mutex
	buildDir string
	builds   = map[string]*build{}
)

type build struct {
	once sync.Once
	path string
	err  error
}

// Build builds the Go package pkg (an import path, as `go build` takes it)
// once per test binary and returns the binary's path. Binaries live in one
// temporary folder; call Cleanup from TestMain to remove it.
func Build(tb testing.TB, pkg string) string {
	tb.Helper()
	buildMu.Lock()
	if buildDir == "" {
		dir, err := os.MkdirTemp("", "sluice-bin-")
		if err != nil {
			buildMu.Unlock()
			tb.Fatal(err)
		}
		buildDir = dir
	}
	b := builds[pkg]
	if b == nil {
		// One folder per package, so that two commands may share a name.
		b = &build{path: filepath.Join(buildDir, fmt.Sprint(len(builds)), filepath.Base(pkg))}
		builds[pkg] = b
	}
	buildMu.Unlock()
	b.once.Do(func() {
		out, err := exec.Command("go", "build", "-o", b.path, pkg).CombinedOutput()
		if err != nil {
			b.err = fmt.Errorf("go build %s: %v\n%s", pkg, err, out)
		}
	})
	if b.err != nil {
		tb.Fatal(b.err)
	}
	return b.path
}

// SluiceBinary builds the sluice command once per test binary.
func SluiceBinary(tb testing.TB) string {
	tb.Helper()
	return Build(tb, SluicePackage)
}

// Cleanup removes the binaries Build made. Call it from TestMain after
// m.Run.
func Cleanup() {
	buildMu.Lock()
	defer buildMu.Unlock()
	if buildDir != "" {
		_ = os.RemoveAll(buildDir)
		buildDir = ""
		builds = map[string]*build{}
	}
}

// SluiceListening matches the line sluice logs once its HTTP listener is up
// (`msg=listening what=api addr=http://127.0.0.1:PORT`, text format); the
// first submatch is the base URL.
var SluiceListening = regexp.MustCompile(`msg=listening .*addr=(http://[0-9A-Za-z.:\[\]]+)`)

// Options tune Start.
type Options struct {
	// Name names the process in failures and logs; default: the binary's
	// base name and the first argument.
	Name string
	// Env is added to the test's environment.
	Env []string
	// Listening matches the output line that says the process listens; its
	// first submatch is the address Addr returns. Default SluiceListening.
	Listening *regexp.Regexp
	// LogFile, if set, gets a copy of the output (stdout and stderr), so
	// that it survives the test.
	LogFile string
	// Quiet: do not print the output when the test failed (LogFile has it).
	Quiet bool
}

// Proc is one running (or exited) process.
type Proc struct {
	Name string
	Cmd  *exec.Cmd

	listening *regexp.Regexp
	ready     chan struct{} // closed once addr is known
	done      chan struct{} // closed once the process has exited and its output is read
	started   time.Time

	mu      sync.Mutex
	out     bytes.Buffer
	partial []byte
	addr    string
	file    *os.File
	paused  bool
	waitErr error
}

// Start runs bin with args. Its stdout and stderr are captured together;
// the process is stopped when the test ends if it still runs.
func Start(tb testing.TB, bin string, args []string, o Options) *Proc {
	tb.Helper()
	if o.Name == "" {
		o.Name = filepath.Base(bin)
		if len(args) > 0 {
			o.Name += " " + args[0]
		}
	}
	if o.Listening == nil {
		o.Listening = SluiceListening
	}
	p := &Proc{Name: o.Name, listening: o.Listening, ready: make(chan struct{}), done: make(chan struct{})}
	if o.LogFile != "" {
		if err := os.MkdirAll(filepath.Dir(o.LogFile), 0o755); err != nil {
			tb.Fatal(err)
		}
		f, err := os.OpenFile(o.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			tb.Fatal(err)
		}
		fmt.Fprintf(f, "=== %s: %s %s (%s)\n", o.Name, bin, strings.Join(args, " "), time.Now().Format(time.RFC3339Nano))
		p.file = f
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), o.Env...)
	cmd.Stdout = p
	cmd.Stderr = p
	p.Cmd = cmd
	if err := cmd.Start(); err != nil {
		if p.file != nil {
			_ = p.file.Close()
		}
		tb.Fatalf("proctest: start %s: %v", o.Name, err)
	}
	p.started = time.Now()
	go func() {
		err := cmd.Wait() // returns once the output is copied too
		p.mu.Lock()
		p.waitErr = err
		if p.file != nil {
			fmt.Fprintf(p.file, "=== %s exited: %v\n", p.Name, cmd.ProcessState)
			_ = p.file.Close()
			p.file = nil
		}
		p.mu.Unlock()
		close(p.done)
	}()
	tb.Cleanup(func() {
		if !p.Exited() {
			p.resumeIfPaused()
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-p.done:
			case <-time.After(20 * time.Second):
				_ = cmd.Process.Kill()
				<-p.done
			}
		}
		if tb.Failed() && !o.Quiet {
			tb.Logf("%s log:\n%s", p.Name, p.Log())
		}
	})
	return p
}

// Write takes the process's output: kept, copied to the log file, and
// scanned line by line for the listening line.
func (p *Proc) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.out.Write(b)
	if p.file != nil {
		_, _ = p.file.Write(b)
	}
	if p.addr != "" {
		return len(b), nil
	}
	p.partial = append(p.partial, b...)
	for {
		i := bytes.IndexByte(p.partial, '\n')
		if i < 0 {
			break
		}
		line := p.partial[:i]
		p.partial = p.partial[i+1:]
		if m := p.listening.FindSubmatch(line); len(m) > 1 {
			p.addr = string(m[1])
			p.partial = nil
			close(p.ready)
			break
		}
	}
	return len(b), nil
}

// Log is everything the process has written so far.
func (p *Proc) Log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.String()
}

// Addr waits (up to within) for the process to log that it listens and
// returns the address it logged. The test fails if the process exits first
// or takes longer.
func (p *Proc) Addr(tb testing.TB, within time.Duration) string {
	tb.Helper()
	select {
	case <-p.ready:
	case <-p.done:
		select {
		case <-p.ready:
		default:
			tb.Fatalf("proctest: %s exited before listening (%v):\n%s", p.Name, p.Cmd.ProcessState, p.Log())
		}
	case <-time.After(within):
		tb.Fatalf("proctest: %s did not start listening within %s:\n%s", p.Name, within, p.Log())
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.addr
}

// BaseURL is Addr with a 20-second limit.
func (p *Proc) BaseURL(tb testing.TB) string {
	tb.Helper()
	return p.Addr(tb, 20*time.Second)
}

// PID is the process id.
func (p *Proc) PID() int { return p.Cmd.Process.Pid }

// Done is closed once the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has exited.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Signal sends sig to the process.
func (p *Proc) Signal(sig os.Signal) error { return p.Cmd.Process.Signal(sig) }

// Kill sends SIGKILL (no cleanup at all, as a crash) and waits for the
// process to be gone.
func (p *Proc) Kill(tb testing.TB) {
	tb.Helper()
	if err := p.Cmd.Process.Kill(); err != nil && !p.Exited() {
		tb.Fatalf("proctest: kill %s: %v", p.Name, err)
	}
	<-p.done
}

// Stop sends SIGTERM and waits up to grace for the process to exit, then
// kills it. It reports whether the process exited by itself, and how long
// that took.
func (p *Proc) Stop(tb testing.TB, grace time.Duration) (clean bool, took time.Duration) {
	tb.Helper()
	p.resumeIfPaused()
	start := time.Now()
	if err := p.Cmd.Process.Signal(syscall.SIGTERM); err != nil && !p.Exited() {
		tb.Fatalf("proctest: SIGTERM %s: %v", p.Name, err)
	}
	select {
	case <-p.done:
		return true, time.Since(start)
	case <-time.After(grace):
		_ = p.Cmd.Process.Kill()
		<-p.done
		return false, time.Since(start)
	}
}

// Wait waits up to within for the process to exit by itself and reports
// whether it did.
func (p *Proc) Wait(within time.Duration) bool {
	select {
	case <-p.done:
		return true
	case <-time.After(within):
		return false
	}
}

// ExitErr is what waiting for the process returned (nil while it runs or
// after a clean exit).
func (p *Proc) ExitErr() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.waitErr
}

// Pause freezes the process (SIGSTOP): its connections stay open and
// nothing is answered. Resume lets it go on.
func (p *Proc) Pause(tb testing.TB) {
	tb.Helper()
	if err := p.Cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		tb.Fatalf("proctest: SIGSTOP %s: %v", p.Name, err)
	}
	p.mu.Lock()
	p.paused = true
	p.mu.Unlock()
}

// Resume continues a paused process (SIGCONT).
func (p *Proc) Resume(tb testing.TB) {
	tb.Helper()
	if err := p.Cmd.Process.Signal(syscall.SIGCONT); err != nil {
		tb.Fatalf("proctest: SIGCONT %s: %v", p.Name, err)
	}
	p.mu.Lock()
	p.paused = false
	p.mu.Unlock()
}

func (p *Proc) resumeIfPaused() {
	p.mu.Lock()
	paused := p.paused
	p.paused = false
	p.mu.Unlock()
	if paused {
		_ = p.Cmd.Process.Signal(syscall.SIGCONT)
	}
}
