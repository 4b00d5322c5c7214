package chaos

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/proctest"
)

// fullFlag selects the full size; SLUICE_CHAOS=full does too.
var fullFlag = flag.Bool("chaos.full", false, "run the full-size fault suite (minutes; default: the short size for CI)")

// leaseTTL is worker.lease_ttl of every scenario's sluice: short, so that a
// dead worker's calls come back quickly (sluice's default is 15s).
var leaseTTL = flag.Duration("chaos.lease-ttl", 5*time.Second, "worker.lease_ttl of the sluice under test")

func full() bool { return *fullFlag || os.Getenv("SLUICE_CHAOS") == "full" }

// fakeEnv carries a fakeSpec to a child process: the test binary, started
// again with it set, serves the fake upstream instead of running tests, so
// that the upstream is a real process that can be killed.
const fakeEnv = "SLUICE_CHAOS_FAKE"

// fakeSpec configures the fake upstream's process.
type fakeSpec struct {
	Listen          string        `json:"listen"`  // host:port; port 0 picks one
	Journal         string        `json:"journal"` // ByPrompt's journal, appended to
	APIKey          string        `json:"api_key"`
	TokensPerSecond float64       `json:"tokens_per_second"`
	Latency         time.Duration `json:"latency"`
}

func TestMain(m *testing.M) {
	if spec := os.Getenv(fakeEnv); spec != "" {
		if err := serveFake(spec); err != nil {
			fmt.Fprintln(os.Stderr, "chaos fake:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	code := m.Run()
	proctest.Cleanup()
	os.Exit(code)
}

// serveFake is the fake upstream's process: fakeanthropic behind
// ByPrompt, whose journal records every call and every complete answer
// before the answer's last bytes leave, so that the count survives a
// SIGKILL. It logs the line proctest.SluiceListening matches, and serves
// until SIGTERM or SIGINT.
func serveFake(raw string) error {
	var spec fakeSpec
	if err := json.Unmarshal([]byte(raw), &spec); err != nil {
		return err
	}
	fake, err := fakeanthropic.New(fakeanthropic.Config{
		Groups: []fakeanthropic.Group{{Name: "sonnet", Models: []string{"claude-*"},
			RPM: 1_000_000, InputTPM: 1_000_000_000, OutputTPM: 1_000_000_000}},
		TokensPerSecond: spec.TokensPerSecond,
		Latency:         spec.Latency,
		APIKeys:         []string{spec.APIKey},
	})
	if err != nil {
		return err
	}
	journal, err := os.OpenFile(spec.Journal, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer journal.Close()
	var ln net.Listener
	for deadline := time.Now().Add(10 * time.Second); ; {
		if ln, err = net.Listen("tcp", spec.Listen); err == nil {
			break
		}
		if !errors.Is(err, syscall.EADDRINUSE) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(20 * time.Millisecond) // the kernel frees the port; nothing to wait on
	}
	srv := &http.Server{Handler: fakeanthropic.CountByPrompt(fake, journal), ReadHeaderTimeout: 10 * time.Second}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	fmt.Fprintf(os.Stderr, "msg=listening what=fake-anthropic addr=http://%s\n", ln.Addr())
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if srv.Shutdown(sctx) != nil {
		_ = srv.Close()
	}
	return nil
}
