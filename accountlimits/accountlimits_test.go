package accountlimits_test

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/accountlimits"
	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/scheduler"
)

const adminKey = "sk-ant-admin-test-0123456789"

type env struct {
	fake  *fakeanthropic.Server
	url   string
	calls *atomic.Int64
	sched *scheduler.Scheduler
	group []config.ModelGroup
	logs  *harness.SyncBuffer
}

func start(t *testing.T) *env {
	t.Helper()
	fake, err := fakeanthropic.New(fakeanthropic.Config{
		Groups:    []fakeanthropic.Group{{Name: "sonnet", Models: []string{"claude-sonnet-*"}, RPM: 50, InputTPM: 30000, OutputTPM: 8000}},
		APIKeys:   []string{"sk-ant-api-key-0123456789"},
		AdminKeys: []string{adminKey},
	})
	if err != nil {
		t.Fatal(err)
	}
	var calls atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/v1/organizations/") {
			calls.Add(1)
		}
		fake.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	rdb := redistest.Start(t).Client(t)
	return &env{fake: fake, url: srv.URL, calls: &calls,
		sched: scheduler.New(rdb, jobs.NewStore(rdb, jobs.Options{}), scheduler.Options{}),
		group: []config.ModelGroup{{Name: "sonnet", Models: []string{"claude-sonnet-4-6", "claude-sonnet-*"}, RPM: 100, InputTPM: 60000, OutputTPM: 16000}},
		logs:  &harness.SyncBuffer{}}
}

func (e *env) sync(key string) *accountlimits.Sync {
	return accountlimits.New(accountlimits.Options{BaseURL: e.url, AdminKey: key, Groups: e.group, Setter: e.sched,
		Logger: slog.New(slog.NewTextHandler(e.logs, nil))})
}

func (e *env) limits(t *testing.T) [3]int {
	t.Helper()
	r, i, o, err := e.sched.AccountLimits(context.Background(), "sonnet")
	if err != nil {
		t.Fatal(err)
	}
	return [3]int{r, i, o}
}

// The account's limits are adopted, and lowered ones within one sync.
func TestAccountLimitsAdoptedAndFollowed(t *testing.T) {
	e := start(t)
	s := e.sync(adminKey)
	ctx := context.Background()
	if err := s.Once(ctx); err != nil {
		t.Fatal(err)
	}
	if got := e.limits(t); got != [3]int{50, 30000, 8000} {
		t.Fatalf("account limits %v, want the fake's 50/30000/8000", got)
	}
	if err := e.fake.SetGroupLimits("sonnet", 20, 10000, 4000); err != nil {
		t.Fatal(err)
	}
	if err := s.Once(ctx); err != nil {
		t.Fatal(err)
	}
	if got := e.limits(t); got != [3]int{20, 10000, 4000} {
		t.Fatalf("after the account's limits were lowered: %v, want 20/10000/4000", got)
	}
	// The limiter uses them: its output bucket holds 95% of 4,000 (read
	// after a step that brings the buckets up to date).
	if _, err := e.sched.Observe(context.Background(), &e.group[0], http.Header{}, true); err != nil {
		t.Fatal(err)
	}
	l, err := e.sched.Levels(ctx, "sonnet")
	if err != nil {
		t.Fatal(err)
	}
	if l.Output != 3800 {
		t.Fatalf("output bucket %v; want 95%% of the account's 4,000", l.Output)
	}
}

// Without an admin key nothing is read.
func TestNoAdminKeyNoCall(t *testing.T) {
	e := start(t)
	if s := e.sync(""); s != nil {
		t.Fatal("a Sync without an admin key")
	}
	if n := e.calls.Load(); n != 0 {
		t.Fatalf("%d calls to the Admin API without a key", n)
	}
}

// A wrong admin key: a clear error, and the limits in force are kept.
func TestWrongAdminKeyKeepsLimits(t *testing.T) {
	e := start(t)
	ctx := context.Background()
	if err := e.sync(adminKey).Once(ctx); err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{"sk-ant-admin-wrong-000000000", "sk-ant-api-key-0123456789"} {
		err := e.sync(key).Once(ctx)
		if err == nil || !strings.Contains(err.Error(), "ANTHROPIC_ADMIN_KEY") {
			t.Fatalf("key %s…: err %v, want one naming ANTHROPIC_ADMIN_KEY", key[:14], err)
		}
		if strings.Contains(err.Error(), key) {
			t.Fatal("the error shows the key")
		}
		if got := e.limits(t); got != [3]int{50, 30000, 8000} {
			t.Fatalf("after a refused read: %v, want the last good 50/30000/8000", got)
		}
	}
}

// A wrong admin key from the first start: the group keeps its configured
// limits, and the log says what to fix without showing the key.
func TestWrongAdminKeyAtStartKeepsConfiguredLimits(t *testing.T) {
	e := start(t)
	const wrong = "sk-ant-admin-wrong-000000000"
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); e.sync(wrong).Run(ctx) }()
	const want = "could not read the account's rate limits; keeping the limits in force"
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(e.logs.String(), want); {
		if time.Now().After(deadline) {
			cancel()
			t.Fatalf("no warning logged within 10 s; log: %q", e.logs.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	<-done
	logs := e.logs.String()
	if !strings.Contains(logs, "ANTHROPIC_ADMIN_KEY") {
		t.Fatalf("the warning does not name ANTHROPIC_ADMIN_KEY: %q", logs)
	}
	if strings.Contains(logs, wrong) || strings.Contains(logs, wrong[len(wrong)-12:]) {
		t.Fatalf("the log shows the key: %q", logs)
	}
	if got := e.limits(t); got != [3]int{} {
		t.Fatalf("account limits %v adopted from a refused read", got)
	}
	// The configured 16,000 output tokens a minute are in force: the
	// output bucket holds 95% of them.
	if _, err := e.sched.Observe(context.Background(), &e.group[0], http.Header{}, true); err != nil {
		t.Fatal(err)
	}
	l, err := e.sched.Levels(context.Background(), "sonnet")
	if err != nil {
		t.Fatal(err)
	}
	if l.Output != 15200 {
		t.Fatalf("output bucket %v; want 95%% of the configured 16,000", l.Output)
	}
}
