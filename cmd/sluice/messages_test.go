package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"log/slog"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/internal/proctest"
	"github.com/sluice-dev/sluice/internal/redistest"
)

// helpText is what `sluice <args>` prints for help (stdout for `help`,
// stderr for a command's --help).
func helpText(t *testing.T, args ...string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	err := run(context.Background(), args, func(string) string { return "" }, &stdout, &stderr)
	if err != nil && !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("%v: %v", args, err)
	}
	return stdout.String() + stderr.String()
}

var (
	tableRow     = regexp.MustCompile(`^  (\S(?:\S| \S)*)( {2,})\S`) // "  term  description"
	continuation = regexp.MustCompile(`^( {3,})\S`)
)

// misaligned returns the lines of a help text whose description column
// differs from the one of the row above it in the same table (a table is a
// run of lines without a blank line or an unindented line), or whose
// continuation line does not start under its description.
func misaligned(help string) []string {
	var bad []string
	col := -1 // the description column of the current table; -1: none yet
	inRow := false
	for _, l := range strings.Split(help, "\n") {
		if l == "" || !strings.HasPrefix(l, " ") {
			col, inRow = -1, false
			continue
		}
		if m := tableRow.FindStringSubmatch(l); m != nil && strings.HasPrefix(l, "  ") && l[2] != ' ' {
			c := 2 + len(m[1]) + len(m[2])
			if col >= 0 && c != col {
				bad = append(bad, l)
			}
			if col < 0 {
				col = c
			}
			inRow = true
			continue
		}
		if m := continuation.FindStringSubmatch(l); m != nil && inRow && col >= 0 && len(m[1]) != col {
			bad = append(bad, l)
		}
		if strings.HasPrefix(l, "  ") && l[2] != ' ' {
			inRow = true // a term too wide for the column: its description follows
		}
	}
	return bad
}

func TestHelpColumnsAligned(t *testing.T) {
	for _, args := range [][]string{{"help"}, {"serve", "--help"}, {"api", "--help"}, {"worker", "--help"}, {"dev", "--help"}, {"fake-anthropic", "--help"},
		{"loadtest", "--help"}, {"migrate", "--help"}, {"keygen", "--help"}, {"healthcheck", "--help"}} {
		help := helpText(t, args...)
		if bad := misaligned(help); len(bad) > 0 {
			t.Errorf("sluice %s: misaligned lines:\n%s\n\nin:\n%s", strings.Join(args, " "), strings.Join(bad, "\n"), help)
		}
	}
	// The checker finds what it should.
	if bad := misaligned("Flags:\n  --a X   one\n  --bb Y   two\n           more\n"); len(bad) != 2 {
		t.Errorf("misaligned found %q", bad)
	}
}

func TestFakeAnthropicTakesDoubleDashFlags(t *testing.T) {
	help := helpText(t, "fake-anthropic", "--help")
	for _, want := range []string{"  --listen ADDRESS ", "  --rpm N ", "  --fault KIND:RATE[:RETRY_AFTER]", "  --count-cache-reads ", "(default 50)"} {
		if !strings.Contains(help, want) {
			t.Errorf("fake-anthropic --help lacks %q:\n%s", want, help)
		}
	}
	if m := regexp.MustCompile(`(?m)^\s+-[a-z]`).FindString(help); m != "" {
		t.Errorf("fake-anthropic --help shows a single-dash flag (%q):\n%s", m, help)
	}
	var stderr bytes.Buffer
	o, err := parseFakeFlags([]string{"--rpm", "7", "-input-tpm", "9", "--listen=127.0.0.1:0", "--fault", "overloaded:0.5", "--count-cache-reads"},
		func(string) string { return "" }, &stderr)
	if err != nil {
		t.Fatal(err)
	}
	if o.group.RPM != 7 || o.group.InputTPM != 9 || o.listen != "127.0.0.1:0" || len(o.faults) != 1 || !o.group.CountCacheReads {
		t.Fatalf("parsed %+v", o)
	}
	if _, err := parseFakeFlags([]string{"--fault", "nope:1"}, func(string) string { return "" }, &stderr); err == nil || !strings.Contains(stderr.String(), "overloaded, api_error") {
		t.Fatalf("unknown fault kind: %v\n%s", err, stderr.String())
	}
}

// A Redis that cannot be used is the only thing printed: no configuration
// dump and no go-redis log lines before it, and for dev, the way out.
func TestBadRedisURLMessageComesAlone(t *testing.T) {
	bin := proctest.SluiceBinary(t)
	path := writeConfig(t, "redis://127.0.0.1:1/0", "http://127.0.0.1:1")
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"serve", []string{"serve", "--config", path, "--listen", "127.0.0.1:0"}, "set REDIS_URL (or redis_url in the configuration file)"},
		{"dev", []string{"dev", "--data", t.TempDir(), "--listen", "127.0.0.1:0"}, "unset REDIS_URL and dev starts its own Redis"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := proctest.Start(t, bin, tc.args, proctest.Options{Env: []string{"REDIS_URL=redis://127.0.0.1:1/0", "SLUICE_LOG_LEVEL=info"}})
			select {
			case <-p.Done():
			case <-time.After(30 * time.Second):
				t.Fatal("sluice did not stop on an unreachable Redis")
			}
			out := strings.TrimSpace(p.Log())
			if strings.Count(out, "\n") != 0 || !strings.HasPrefix(out, "sluice: cannot reach Redis at redis://127.0.0.1:1/0") || !strings.Contains(out, tc.want) {
				t.Fatalf("output:\n%s\nwant one line: sluice: cannot reach Redis at redis://127.0.0.1:1/0 …; %s", out, tc.want)
			}
		})
	}
}

func TestRedisProblemMessages(t *testing.T) {
	for _, tc := range []struct {
		err  string
		want string
	}{
		{"NOAUTH Authentication required.", "refused sluice's credentials"},
		{"WRONGPASS invalid username-password pair or user is disabled.", "give its password in the URL"},
		{"ERR DB index is out of range", "no such database"},
		{`redis: invalid reply: "<!DOCTYPE HTML>\n"`, "does not answer as Redis does"},
		{"tls: first record does not look like a TLS handshake", "rediss://"},
	} {
		err := redisProblem("redis://h:6379/0", errors.New(tc.err), "")
		if !strings.Contains(err.Error(), tc.want) || !strings.HasSuffix(err.Error(), "; set REDIS_URL (or redis_url in the configuration file) to the Redis sluice should use") {
			t.Errorf("%s: %v", tc.err, err)
		}
	}
}

var millisRE = regexp.MustCompile(`\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(Z|[+-]\d\d:\d\d)`)

// Log times have exactly three fractional digits in both formats, the
// record's own and logged time values alike.
func TestLogTimesHaveMilliseconds(t *testing.T) {
	at := time.Date(2026, 11, 29, 20, 24, 3, 0, time.UTC)
	for _, format := range []string{"json", "text"} {
		var b bytes.Buffer
		newLogger(config.Log{Format: format, Level: "info"}, &b).Info("x", "at", at, "at_590", at.Add(590*time.Millisecond))
		out := b.String()
		if !strings.Contains(out, "2026-11-29T20:24:03.000Z") || !strings.Contains(out, "2026-11-29T20:24:03.590Z") {
			t.Errorf("%s: time values not in milliseconds: %s", format, out)
		}
		if got := millisRE.FindAllString(out, -1); len(got) != 3 {
			t.Errorf("%s: %d times with three digits, want 3 (the record's and two values): %s", format, len(got), out)
		}
	}
	var b bytes.Buffer
	slog.New(slog.NewJSONHandler(&b, nil)).Info("x", "at", at)
	if strings.Contains(b.String(), ".000Z") {
		t.Log("slog's JSON handler now writes fixed milliseconds itself; millisTimes could go")
	}
}

// serve's configuration dump shows what is true of the process: the port
// picked for :0, and no worker_listen where no separate worker listens.
func TestDumpShowsWhatListens(t *testing.T) {
	r := redistest.Start(t)
	path := writeConfig(t, r.URL, "http://127.0.0.1:1")
	base, stderr, _ := startRun(t, []string{"serve", "--config", path, "--listen", "127.0.0.1:0"}, func(string) string { return "" })
	out := stderr.String()
	addr := strings.TrimPrefix(base, "http://")
	if !regexp.MustCompile(`(?m)^  listen +` + regexp.QuoteMeta(addr) + ` \(the api, and the worker's health and metrics\)$`).MatchString(out) {
		t.Errorf("dump does not show the bound address %s:\n%s", addr, out)
	}
	if !regexp.MustCompile(`(?m)^  worker_listen +not used: `).MatchString(out) {
		t.Errorf("dump shows a worker_listen nothing listens on:\n%s", out)
	}
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "time=") && !millisRE.MatchString(l) {
			t.Errorf("log line without a millisecond time: %s", l)
		}
	}
}
