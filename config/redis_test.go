package config

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestRedisModeDefaults(t *testing.T) {
	d := Default()
	if d.Redis.Mode != "single" || d.Redis.WaitReplicas != 0 || d.Redis.WaitTimeout != time.Second {
		t.Errorf("Default redis = %+v, want mode single, wait_replicas 0, wait_timeout 1s", d.Redis)
	}
	c := mustParse(t, minimal, env("REDIS_MODE", " Sentinel ", "REDIS_URL", "redis://s1:26379/0?addr=s2:26379&master_name=mymaster"))
	if c.Redis.Mode != RedisSentinel {
		t.Errorf("REDIS_MODE: mode %q, want sentinel", c.Redis.Mode)
	}
	c = mustParse(t, minimal+"redis: {wait_replicas: 1, wait_timeout: 500ms}\n", env())
	if c.Redis.WaitReplicas != 1 || c.Redis.WaitTimeout != 500*time.Millisecond {
		t.Errorf("wait fields = %d, %s", c.Redis.WaitReplicas, c.Redis.WaitTimeout)
	}
}

// Every mode's URL forms that work, and every bad combination, with the
// message that names the fix.
func TestRedisModes(t *testing.T) {
	tests := []struct {
		name, mode, url, extra string
		want                   []string // problems; nil = valid
	}{
		{name: "single", mode: "single", url: "redis://:pw@cache:6379/2"},
		{name: "single tls", mode: "single", url: "rediss://cache:6380/0"},
		{name: "single unix", mode: "single", url: "unix:///run/redis.sock"},
		{name: "sentinel", mode: "sentinel", url: "redis://s1:26379/0?addr=s2:26379&addr=s3:26379&master_name=mymaster"},
		{name: "sentinel tls and password", mode: "sentinel", url: "rediss://s1:26379/1?master_name=m&password=pw"},
		{name: "sentinel without master_name", mode: "sentinel", url: "redis://s1:26379/0?addr=s2:26379",
			want: []string{`redis_url: redis.mode is sentinel but the URL names no master: add ?master_name=NAME (the name in the sentinels' "sentinel monitor NAME …" line)`}},
		{name: "sentinel unix", mode: "sentinel", url: "unix:///run/redis.sock",
			want: []string{"redis_url: not a valid Redis Sentinel URL (redis.mode is sentinel): want the sentinels, redis://SENTINEL:26379/0?addr=SENTINEL2:26379&addr=SENTINEL3:26379&master_name=NAME (rediss:// for TLS): redis: invalid URL scheme: unix"}},
		{name: "single with sentinel parameters", mode: "single", url: "redis://s1:26379/0?master_name=mymaster",
			want: []string{"redis_url: the URL has master_name or addr, as a Sentinel or Cluster URL does, but redis.mode is single: set redis.mode (REDIS_MODE) to sentinel or cluster"}},
		{name: "unknown mode", mode: "replicated", url: "redis://cache:6379/0",
			want: []string{`redis.mode: must be "single" (one Redis), "sentinel" (a primary found through Sentinel) or "cluster", got "replicated"`}},
		{name: "cluster", mode: "cluster", url: "redis://n1:7000?addr=n2:7001"},
		{name: "cluster with a database", mode: "cluster", url: "redis://n1:7000/3?addr=n2:7001",
			want: []string{`redis_url: redis.mode is cluster, and Redis Cluster has database 0 only: drop "/3" from the URL's end`}},
		{name: "wait without timeout", mode: "single", url: "redis://cache:6379/0", extra: "redis: {wait_replicas: 1, wait_timeout: 0s}",
			want: []string{"redis.wait_timeout: must be > 0 while redis.wait_replicas is set (a WAIT without a timeout blocks until the replicas answer, for ever if they are gone), got 0s"}},
		{name: "wait longer than the call", mode: "single", url: "redis://cache:6379/0", extra: "redis: {wait_replicas: 1, wait_timeout: 3s}",
			want: []string{"redis.wait_timeout: must be less than redis.timeout (2s): the script and its WAIT are one call bounded by it; got 3s"}},
		{name: "negative wait", mode: "single", url: "redis://cache:6379/0", extra: "redis: {wait_replicas: -1}",
			want: []string{"redis.wait_replicas: must be ≥ 0 (0 means no WAIT), got -1"}},
		{name: "no wait, no timeout check", mode: "single", url: "redis://cache:6379/0", extra: "redis: {wait_timeout: 0s}"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(minimal+tt.extra+"\n"), env("REDIS_MODE", tt.mode, "REDIS_URL", tt.url))
			if tt.want == nil {
				if err != nil {
					t.Fatalf("want valid, got:\n%v", err)
				}
				return
			}
			var got []string
			for _, m := range messages(t, err) {
				got = append(got, strings.ReplaceAll(strings.ReplaceAll(m, " (set by REDIS_URL)", ""), " (set by REDIS_MODE)", ""))
			}
			want := append([]string(nil), tt.want...)
			slices.Sort(want)
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("problems (-want +got):\n%s", diff)
			}
		})
	}
}

func TestDumpHidesSentinelPassword(t *testing.T) {
	c := mustParse(t, minimal, env("REDIS_MODE", "sentinel", "REDIS_URL", "redis://sentuser:sentpw@s1:26379/0?master_name=m&password=primarypw"))
	var b strings.Builder
	c.Dump(&b)
	out := b.String()
	for _, secret := range []string{"sentpw", "primarypw"} {
		if strings.Contains(out, secret) {
			t.Errorf("Dump shows %q:\n%s", secret, out)
		}
	}
	if !strings.Contains(out, "redis.mode") || !strings.Contains(out, "sentinel") {
		t.Errorf("Dump lacks redis.mode:\n%s", out)
	}
}
