package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/alicebob/miniredis/v2"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/fakeanthropic"
)

// devHelp is `sluice dev --help`.
var devHelp = `Usage: sluice dev [flags]

Zero-setup sluice on this machine: the api and a worker in one process, a
tenant and an admin key made up for you, and (unless ANTHROPIC_API_KEY is set)
a fake Anthropic API with tier-1 limits (50 RPM, 30,000 input and 8,000
output tokens per minute) so queues form quickly.

Redis: REDIS_URL if set; else a redis-server found on PATH, started on a free
port with its data under --data; else an embedded in-memory Redis (nothing
survives a restart).

Flags:
` + helpTable(
	[2]string{"--listen ADDR", "the api's address (env SLUICE_LISTEN; default 127.0.0.1:8080)"},
	[2]string{"--config PATH", "use this configuration file instead of the built-in one (env SLUICE_CONFIG); the fake upstream still starts unless ANTHROPIC_API_KEY is set"},
	[2]string{"--data DIR", "where dev keeps its Redis data and keys (default .sluice-dev)"},
) + `
Environment:
` + helpTable(
	[2]string{"REDIS_URL", "use this Redis instead of starting one"},
	[2]string{"ANTHROPIC_API_KEY", "talk to the real Anthropic API instead of the fake"},
	[2]string{"ANTHROPIC_BASE_URL", "the upstream's base URL (with ANTHROPIC_API_KEY)"},
	[2]string{"SLUICE_LOG_FORMAT", "text or json, as for serve"},
	[2]string{"SLUICE_LOG_LEVEL", "debug, info, warn or error, as for serve"},
)

// runDev runs `sluice dev`.
func runDev(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("dev", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, devHelp) }
	listen := fs.String("listen", envOr(getenv, "SLUICE_LISTEN", "127.0.0.1:8080"), "")
	configPath := fs.String("config", getenv("SLUICE_CONFIG"), "")
	dataDir := fs.String("data", ".sluice-dev", "")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := os.MkdirAll(*dataDir, 0o700); err != nil {
		return fmt.Errorf("dev data folder: %w", err)
	}

	// Redis.
	redisURL := getenv("REDIS_URL")
	redisNote := "REDIS_URL"
	dev := roles{api: true, worker: true}
	if redisURL != "" {
		dev.redisHint = "unset REDIS_URL and dev starts its own Redis (or set it to a Redis that answers)"
	} else {
		url, stop, note, err := devRedis(*dataDir, stderr)
		if err != nil {
			return err
		}
		defer stop()
		redisURL, redisNote = url, note
		dev.ownRedis = filepath.Join(*dataDir, "redis")
	}

	// Upstream.
	upstreamURL := getenv("ANTHROPIC_BASE_URL")
	upstreamNote := "the real Anthropic API"
	upstreamKey := getenv("ANTHROPIC_API_KEY")
	if upstreamKey == "" {
		upstreamKey = "sk-fake-dev-key" // the fake wants some key, like the real API
		fake, err := fakeanthropic.New(fakeanthropic.Config{
			Groups: fakeanthropic.TierOne(), TokensPerSecond: 60, Latency: 300 * time.Millisecond,
		})
		if err != nil {
			return err
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		fsrv := &http.Server{Handler: fake, ReadHeaderTimeout: 10 * time.Second}
		go func() { _ = fsrv.Serve(ln) }()
		defer func() {
			sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			_ = fsrv.Shutdown(sctx)
		}()
		upstreamURL = "http://" + ln.Addr().String()
		upstreamNote = "a fake Anthropic API with tier-1 limits at " + upstreamURL + " (stats: " + upstreamURL + "/_fake/stats)"
		dev.fakeUpstream = true
	}

	tenantKey, adminKey, err := devKeys(*dataDir)
	if err != nil {
		return err
	}
	env := func(name string) string {
		switch name {
		case "REDIS_URL":
			return redisURL
		case "REDIS_MODE":
			if redisNote != "REDIS_URL" {
				return "single" // dev's own Redis
			}
		case "ANTHROPIC_BASE_URL":
			return upstreamURL
		case "SLUICE_LISTEN":
			return *listen
		case "ANTHROPIC_API_KEY":
			return upstreamKey
		}
		return getenv(name)
	}
	var cfg *config.Config
	if *configPath != "" {
		cfg, err = config.Load(*configPath, env)
	} else {
		cfg, err = config.Parse([]byte(devConfig(tenantKey, adminKey)), env)
	}
	if err != nil {
		return fmt.Errorf("configuration:\n%w", err)
	}
	cfg.Listen = *listen

	return serve(ctx, cfg, dev, stdout, stderr, func(addr string) {
		base := "http://" + addr
		model := "claude-sonnet-4-6"
		if *configPath != "" {
			model = strings.ReplaceAll(cfg.ModelGroups[0].Models[0], "*", "4-6")
		}
		key := tenantKey
		admin := adminKey
		if *configPath != "" {
			key, admin = "(a tenant key from your config)", "(an admin key from your config)"
		}
		fmt.Fprintf(stdout, `
sluice dev is running.
  api:        %[1]s
  demo page:  %[1]s/#key=%[2]s&user=student-1&model=%[5]s
  dashboard:  %[1]s/dashboard    (user: anything, password: the admin key)
  monitoring: %[1]s/monitoring/  (asynqmon; the same)
  metrics:    %[1]s/metrics
  redis:      %[3]s
  upstream:   %[4]s

tenant key: %[2]s
admin key: %[6]s

Submit a job and follow its events:

  JOB=$(curl -s %[1]s/v1/jobs -H 'x-api-key: %[2]s' -H 'content-type: application/json' \
    -d '{"user_id":"alice","request":{"model":"%[5]s","max_tokens":200,"messages":[{"role":"user","content":"Hello, sluice!"}]}}' \
    | grep -o '"id":"[^"]*"' | head -1 | cut -d'"' -f4) && echo "job $JOB" && \
  curl -sN %[1]s/v1/jobs/$JOB/events -H 'x-api-key: %[2]s'

Spend bob's quota (20 requests an hour) and read the refusal:

  for i in $(seq 21); do curl -s -o /tmp/sluice-last.json -w '%%{http_code} ' %[1]s/v1/jobs -H 'x-api-key: %[2]s'     -d '{"user_id":"bob","request":{"model":"%[5]s","max_tokens":20,"messages":[{"role":"user","content":"hi"}]}}'; done;   echo; cat /tmp/sluice-last.json; echo
  curl -s %[1]s/v1/users/bob/usage -H 'x-api-key: %[2]s'

Read the usage statistics of the last 24 hours (admin key):

  curl -s '%[1]s/v1/admin/usage?hours=24' -H 'x-api-key: %[6]s'

`, base, key, redisNote, upstreamNote, model, admin)
	})
}

// devConfig is dev's built-in configuration: one group for every claude-*
// model with tier-1 limits, one tenant, one admin key.
func devConfig(tenantKey, adminKey string) string {
	return fmt.Sprintf(`# sluice dev's built-in configuration
admin_keys: [%q]
tenants:
  - name: dev
    keys: [%q]
    # Small quotas so you can watch one being spent and refused.
    requests_per_hour: 20
    tokens_per_hour: 100000
    max_queued: 20
model_groups:
  - name: claude
    models: ["claude-*"]
    rpm: 50
    input_tpm: 30000
    output_tpm: 8000
    max_concurrency: 8
`, adminKey, tenantKey)
}

// devKeys returns dev's tenant and admin keys, made once and kept in the
// data folder so the curl you copied keeps working across restarts.
func devKeys(dir string) (tenant, admin string, err error) {
	path := filepath.Join(dir, "keys")
	if b, err := os.ReadFile(path); err == nil {
		lines := strings.Fields(string(b))
		if len(lines) == 2 && len(lines[0]) >= 16 && len(lines[1]) >= 16 {
			return lines[0], lines[1], nil
		}
	}
	tenant, admin = "sk-dev-"+randomHex(16), "sk-admin-"+randomHex(16)
	if err := os.WriteFile(path, []byte(tenant+"\n"+admin+"\n"), 0o600); err != nil {
		return "", "", fmt.Errorf("saving dev keys: %w", err)
	}
	return tenant, admin, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// devRedis starts a redis-server from PATH on a free port with its data in
// dir/redis, or, without one, an embedded miniredis.
func devRedis(dir string, stderr io.Writer) (url string, stop func(), note string, err error) {
	bin, lookErr := exec.LookPath("redis-server")
	if lookErr != nil {
		m := miniredis.NewMiniRedis()
		if err := m.Start(); err != nil {
			return "", nil, "", fmt.Errorf("embedded redis: %w", err)
		}
		fmt.Fprintln(stderr, strings.Repeat("!", 78))
		fmt.Fprintln(stderr, "!! No redis-server on PATH and no REDIS_URL: using an EMBEDDED IN-MEMORY Redis.")
		fmt.Fprintln(stderr, "!! NOTHING SURVIVES A RESTART. Install redis-server or set REDIS_URL to keep jobs.")
		fmt.Fprintln(stderr, strings.Repeat("!", 78))
		return "redis://" + m.Addr() + "/0", m.Close, "embedded in-memory Redis (miniredis) — nothing survives a restart", nil
	}
	data, err := filepath.Abs(filepath.Join(dir, "redis"))
	if err != nil {
		return "", nil, "", err
	}
	if err := os.MkdirAll(data, 0o700); err != nil {
		return "", nil, "", err
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, "", err
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	cmd := exec.Command(bin, "--port", fmt.Sprint(port), "--bind", "127.0.0.1", "--dir", data,
		"--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--maxmemory-policy", "noeviction")
	out, _ := cmd.StdoutPipe()
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		return "", nil, "", fmt.Errorf("starting redis-server: %w", err)
	}
	go func() { // keep its pipe drained
		sc := bufio.NewScanner(out)
		for sc.Scan() {
		}
	}()
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	deadline := time.Now().Add(10 * time.Second)
	for !redisAnswers(addr) {
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			return "", nil, "", errors.New("redis-server did not start; set REDIS_URL to use another Redis")
		}
		time.Sleep(20 * time.Millisecond) // waiting on another process to listen
	}
	stop = func() {
		_ = cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	}
	return "redis://" + addr + "/0", stop, "redis-server (pid " + fmt.Sprint(cmd.Process.Pid) + ") on " + addr + ", data in " + data, nil
}

// redisAnswers reports whether a Redis at addr answers PING with PONG. It
// speaks the protocol itself rather than through go-redis, whose pool logs
// every refused connection while redis-server is still starting.
func redisAnswers(addr string) bool {
	conn, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
	if err != nil {
		return false
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(200 * time.Millisecond))
	if _, err := io.WriteString(conn, "PING\r\n"); err != nil {
		return false
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	return err == nil && line == "+PONG\r\n"
}
