package redisconn_test

import (
	"bytes"
	"context"
	"log/slog"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/redisconn"
)

// New builds the client of each mode; asynqmon's option matches it.
func TestNewModes(t *testing.T) {
	for _, tt := range []struct {
		mode, url string
		client    string // the client's type
		opt       asynq.RedisConnOpt
	}{
		{"single", "redis://:pw@cache:6379/2", "*redis.Client",
			asynq.RedisClientOpt{Network: "tcp", Addr: "cache:6379", Password: "pw", DB: 2, DialTimeout: time.Second, ReadTimeout: time.Second, WriteTimeout: time.Second}},
		{"", "redis://cache:6379/0", "*redis.Client",
			asynq.RedisClientOpt{Network: "tcp", Addr: "cache:6379", DialTimeout: time.Second, ReadTimeout: time.Second, WriteTimeout: time.Second}},
		{"sentinel", "redis://su:sp@s1:26379/3?addr=s2:26379&master_name=mymaster&password=pp", "*redis.Client",
			asynq.RedisFailoverClientOpt{MasterName: "mymaster", SentinelAddrs: []string{"s1:26379", "s2:26379"}, SentinelUsername: "su", SentinelPassword: "sp",
				Password: "pp", DB: 3, DialTimeout: time.Second, ReadTimeout: time.Second, WriteTimeout: time.Second}},
		{"cluster", "redis://n1:7000?addr=n2:7001", "*redis.ClusterClient",
			asynq.RedisClusterClientOpt{Addrs: []string{"n1:7000", "n2:7001"}, DialTimeout: time.Second, ReadTimeout: time.Second, WriteTimeout: time.Second}},
	} {
		t.Run(tt.mode, func(t *testing.T) {
			c, err := redisconn.New(tt.mode, tt.url, time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if got := typeName(c); got != tt.client {
				t.Errorf("client %s, want %s", got, tt.client)
			}
			opt, err := redisconn.AsynqOpt(tt.mode, tt.url, time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(opt, tt.opt) {
				t.Errorf("asynq option\n got %#v\nwant %#v", opt, tt.opt)
			}
		})
	}
	for _, bad := range []struct{ mode, url, want string }{
		{"sentinel", "redis://s1:26379/0", "master_name"},
		{"ring", "redis://cache:6379/0", `unknown mode "ring"`},
		{"single", "http://cache", "invalid URL scheme"},
	} {
		if _, err := redisconn.New(bad.mode, bad.url, time.Second); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("New(%q, %q) = %v, want an error with %q", bad.mode, bad.url, err, bad.want)
		}
		if _, err := redisconn.AsynqOpt(bad.mode, bad.url, time.Second); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("AsynqOpt(%q, %q) = %v, want an error with %q", bad.mode, bad.url, err, bad.want)
		}
	}
}

func typeName(c redis.UniversalClient) string {
	switch c.(type) {
	case *redis.Client:
		return "*redis.Client"
	case *redis.ClusterClient:
		return "*redis.ClusterClient"
	}
	return "other"
}

var incr = redis.NewScript(`return redis.call('INCR', KEYS[1])`)

// The Waiter runs the script and WAIT on one connection: with the replica
// up, the WAIT hears from it; with the replica gone, the script still runs
// and the short WAIT is counted and logged once per run.
func TestWaiter(t *testing.T) {
	primary := redistest.Start(t)
	i := strings.LastIndexByte(primary.Addr, ':')
	replica := redistest.StartArgs(t, "--replicaof", primary.Addr[:i], primary.Addr[i+1:])
	ctx := context.Background()
	rc := replica.Client(t)
	waitSynced(t, rc)

	c, err := redisconn.New("single", primary.URL, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var logs bytes.Buffer
	w := redisconn.NewWaiter(1, 300*time.Millisecond, slog.New(slog.NewTextHandler(&logs, nil)))

	// The script is not cached yet: EVALSHA's NOSCRIPT falls back to EVAL.
	if err := c.ScriptFlush(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	for n := int64(1); n <= 3; n++ {
		got, err := w.Run(ctx, c, "admit", incr, []string{"k"}).Int64()
		if err != nil || got != n {
			t.Fatalf("run %d: %d, %v", n, got, err)
		}
		// WAIT returned only once the replica had the write.
		if v, err := rc.Get(ctx, "k").Int64(); err != nil || v != n {
			t.Fatalf("run %d: the replica has %d (%v) right after the WAIT", n, v, err)
		}
	}
	if s := w.Short("admit"); s != 0 {
		t.Fatalf("%d short WAITs with the replica up", s)
	}

	replica.Kill(t)
	start := time.Now()
	for range 3 {
		if _, err := w.Run(ctx, c, "end", incr, []string{"k"}).Int64(); err != nil {
			t.Fatal(err)
		}
	}
	if took := time.Since(start); took < 900*time.Millisecond {
		t.Errorf("3 WAITs without a replica took %s; each should wait its 300ms", took)
	}
	if s := w.Short("end"); s != 3 {
		t.Errorf("%d short WAITs counted, want 3", s)
	}
	if n := strings.Count(logs.String(), "fewer replicas"); n != 1 {
		t.Errorf("%d warnings for one run of short WAITs, want 1:\n%s", n, logs.String())
	}
	replica.Revive(t)
	waitSynced(t, rc)
	if _, err := w.Run(ctx, c, "end", incr, []string{"k"}).Int64(); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), "acknowledge writes again") {
		t.Errorf("the end of the run is not logged:\n%s", logs.String())
	}

	// A script error is the script's, and no WAIT is counted for it.
	bad := redis.NewScript(`return redis.error_reply('STATE queued')`)
	if err := w.Run(ctx, c, "end", bad, []string{"k"}).Err(); err == nil || !strings.Contains(err.Error(), "STATE queued") {
		t.Errorf("script error = %v", err)
	}
	// Without a Waiter, Run is the script's Run.
	var none *redisconn.Waiter
	if v, err := none.Run(ctx, c, "admit", incr, []string{"k"}).Int64(); err != nil || v != 8 {
		t.Errorf("nil Waiter: %d, %v", v, err)
	}
	if redisconn.NewWaiter(0, time.Second, nil) != nil {
		t.Error("NewWaiter(0) is not nil")
	}
}

func waitSynced(t *testing.T, rc *redis.Client) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		info, err := rc.Info(context.Background(), "replication").Result()
		if err == nil && strings.Contains(info, "master_link_status:up") {
			return
		}
		time.Sleep(20 * time.Millisecond) // replication handshake: nothing to wait on
	}
	t.Fatal("the replica did not sync")
}

// A Sentinel client follows the primary through a failover by itself.
func TestSentinelClientFollowsFailover(t *testing.T) {
	s := redistest.StartSentinel(t, redistest.SentinelOptions{})
	c, err := redisconn.New("sentinel", s.URL, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	if err := c.Set(ctx, "k", "before", 0).Err(); err != nil {
		t.Fatal(err)
	}
	w := redisconn.NewWaiter(1, time.Second, slog.New(slog.NewTextHandler(&bytes.Buffer{}, nil)))
	if err := w.Run(ctx, c, "admit", incr, []string{"n"}).Err(); err != nil {
		t.Fatal(err)
	}
	s.KillPrimary(t)
	s.WaitPromoted(t, 60*time.Second)
	var got string
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if got, err = c.Get(ctx, "k").Result(); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond) // the client's next dial asks the sentinels
	}
	if got != "before" {
		t.Fatalf("after the failover: %q, %v", got, err)
	}
	if n, err := c.Get(ctx, "n").Int(); err != nil || n != 1 {
		t.Errorf("the WAITed write after the failover: %d, %v", n, err)
	}
	if err := c.Set(ctx, "k", "after", 0).Err(); err != nil {
		t.Errorf("writing to the new primary: %v", err)
	}
}
