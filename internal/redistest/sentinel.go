package redistest

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// MasterName is the name the sentinels of StartSentinel monitor.
const MasterName = "mymaster"

// Sentinels is a primary, one replica and three sentinels (quorum 2), on
// free ports in temporary folders, stopped when the test ends: the smallest
// Redis that fails over by itself.
type Sentinels struct {
	Primary, Replica *Server
	// Addrs are the sentinels' host:port.
	Addrs []string
	// URL is the Sentinel URL of the set for redis.mode sentinel:
	// redis://s1/0?addr=s2&addr=s3&master_name=mymaster.
	URL  string
	cmds []*exec.Cmd
}

// SentinelOptions tune StartSentinel; zero values take the defaults.
type SentinelOptions struct {
	DownAfter       time.Duration // sentinel down-after-milliseconds; default 1s
	FailoverTimeout time.Duration // sentinel failover-timeout; default 3s
}

// StartSentinel starts the set and returns once the replica is in sync and
// every sentinel knows the primary, the replica and the two other
// sentinels (so a failover can be agreed at once).
func StartSentinel(tb testing.TB, o SentinelOptions) *Sentinels {
	tb.Helper()
	if o.DownAfter <= 0 {
		o.DownAfter = time.Second
	}
	if o.FailoverTimeout <= 0 {
		o.FailoverTimeout = 3 * time.Second
	}
	s := &Sentinels{Primary: Start(tb)}
	host, port := splitAddr(s.Primary.Addr)
	s.Replica = StartArgs(tb, "--replicaof", host, port)
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		tb.Fatalf("redistest: redis-server not found on PATH: %v", err)
	}
	for i := 0; i < 3; i++ {
		s.startSentinel(tb, bin, i, o)
	}
	tb.Cleanup(s.stopSentinels)
	s.URL = "redis://" + s.Addrs[0] + "/0?addr=" + s.Addrs[1] + "&addr=" + s.Addrs[2] + "&master_name=" + MasterName
	s.waitReady(tb, 30*time.Second)
	return s
}

func splitAddr(addr string) (host, port string) {
	i := strings.LastIndexByte(addr, ':')
	return addr[:i], addr[i+1:]
}

func (s *Sentinels) startSentinel(tb testing.TB, bin string, i int, o SentinelOptions) {
	tb.Helper()
	dir := tb.TempDir()
	host, port := splitAddr(s.Primary.Addr)
	var lastErr error
	for try := 0; try < 5; try++ {
		p, err := freePort()
		if err != nil {
			tb.Fatalf("redistest: %v", err)
		}
		conf := filepath.Join(dir, "sentinel.conf")
		text := fmt.Sprintf(`port %d
bind 127.0.0.1
dir %s
daemonize no
loglevel warning
sentinel monitor %s %s %s 2
sentinel down-after-milliseconds %s %d
sentinel failover-timeout %s %d
sentinel parallel-syncs %s 1
`, p, dir, MasterName, host, port, MasterName, o.DownAfter.Milliseconds(), MasterName, o.FailoverTimeout.Milliseconds(), MasterName)
		if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
			tb.Fatal(err)
		}
		cmd := exec.Command(bin, conf, "--sentinel")
		out, err := cmd.StdoutPipe()
		if err != nil {
			tb.Fatal(err)
		}
		cmd.Stderr = cmd.Stdout
		if err := cmd.Start(); err != nil {
			tb.Fatal(err)
		}
		go func() { // drain, so it never blocks on a full pipe
			sc := bufio.NewScanner(out)
			for sc.Scan() {
			}
		}()
		addr := fmt.Sprintf("127.0.0.1:%d", p)
		if lastErr = answers(addr, 10*time.Second, cmd); lastErr == nil {
			s.Addrs = append(s.Addrs, addr)
			s.cmds = append(s.cmds, cmd)
			return
		}
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}
	tb.Fatalf("redistest: could not start sentinel %d: %v", i, lastErr)
}

// answers waits until the server at addr answers PING.
func answers(addr string, within time.Duration, cmd *exec.Cmd) error {
	c := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1})
	defer c.Close()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		err := c.Ping(ctx).Err()
		cancel()
		if err == nil {
			return nil
		}
		if cmd.ProcessState != nil {
			break
		}
		time.Sleep(10 * time.Millisecond) // an external process starting to listen: nothing to wait on
	}
	return fmt.Errorf("%s did not answer", addr)
}

// waitReady waits until the replica is in sync and each sentinel sees
// one replica and two other sentinels.
func (s *Sentinels) waitReady(tb testing.TB, within time.Duration) {
	tb.Helper()
	deadline := time.Now().Add(within)
	rc := redis.NewClient(&redis.Options{Addr: s.Replica.Addr})
	defer rc.Close()
	var why string
	for time.Now().Before(deadline) {
		why = s.notReady(rc)
		if why == "" {
			return
		}
		time.Sleep(50 * time.Millisecond) // sentinels discover each other every 2 s (hello messages): nothing to wait on
	}
	tb.Fatalf("redistest: sentinel set not ready within %s: %s", within, why)
}

func (s *Sentinels) notReady(rc *redis.Client) string {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	info, err := rc.Info(ctx, "replication").Result()
	if err != nil || !strings.Contains(info, "master_link_status:up") {
		return "replica not in sync"
	}
	for _, a := range s.Addrs {
		sc := redis.NewSentinelClient(&redis.Options{Addr: a})
		m, err := sc.Master(ctx, MasterName).Result()
		_ = sc.Close()
		if err != nil {
			return a + ": " + err.Error()
		}
		if m["num-slaves"] != "1" || m["num-other-sentinels"] != "2" {
			return fmt.Sprintf("%s sees %s replicas and %s other sentinels", a, m["num-slaves"], m["num-other-sentinels"])
		}
	}
	return ""
}

// MasterAddr is the primary's address as the first sentinel that answers
// states it.
func (s *Sentinels) MasterAddr(ctx context.Context) (string, error) {
	var lastErr error
	for _, a := range s.Addrs {
		sc := redis.NewSentinelClient(&redis.Options{Addr: a})
		v, err := sc.GetMasterAddrByName(ctx, MasterName).Result()
		_ = sc.Close()
		if err == nil && len(v) == 2 {
			return v[0] + ":" + v[1], nil
		}
		lastErr = err
	}
	return "", lastErr
}

// KillPrimary SIGKILLs the primary (it stays down). The sentinels promote
// the replica after down-after-milliseconds and their vote.
func (s *Sentinels) KillPrimary(tb testing.TB) {
	tb.Helper()
	s.Primary.Kill(tb)
}

// WaitPromoted waits until the sentinels name the replica as the primary
// and the replica answers as one; it returns how long that took from now.
func (s *Sentinels) WaitPromoted(tb testing.TB, within time.Duration) time.Duration {
	tb.Helper()
	start := time.Now()
	rc := redis.NewClient(&redis.Options{Addr: s.Replica.Addr})
	defer rc.Close()
	for time.Since(start) < within {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		addr, _ := s.MasterAddr(ctx)
		role := ""
		if addr == s.Replica.Addr {
			if r, err := rc.Do(ctx, "role").Slice(); err == nil && len(r) > 0 {
				role = fmt.Sprint(r[0])
			}
		}
		cancel()
		if role == "master" {
			return time.Since(start)
		}
		time.Sleep(20 * time.Millisecond) // the sentinels' vote: nothing to wait on
	}
	tb.Fatalf("redistest: the replica was not promoted within %s", within)
	return 0
}

func (s *Sentinels) stopSentinels() {
	for _, c := range s.cmds {
		_ = c.Process.Kill()
		_ = c.Wait()
	}
	s.cmds = nil
}
