package redisconn_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/internal/redistest"
	"github.com/sluice-dev/sluice/redisconn"
)

// In a cluster the WAIT goes to the master of the script's slot: a script
// writing on each of the three masters is on that master's replica the
// moment Run returns, and no WAIT comes back short. When the slot has moved
// since the client read its map, the script still runs, on the new master,
// and its missing WAIT counts as short.
func TestWaiterInCluster(t *testing.T) {
	c := redistest.StartCluster(t, redistest.ClusterOptions{Masters: 3, ReplicasPerMaster: 1})
	rdb, err := redisconn.New(redisconn.Cluster, c.URL, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	w := redisconn.NewWaiter(1, 2*time.Second, slog.New(slog.NewTextHandler(io.Discard, nil)))
	script := redis.NewScript(`redis.call('SET', KEYS[1], ARGV[1]) return 1`)
	ctx := context.Background()

	replicaOf := func(m *redistest.Server) *redistest.Server {
		for i, mm := range c.Masters {
			if mm == m {
				return c.Replicas[i][0]
			}
		}
		t.Fatalf("%s is not one of the masters", m.Addr)
		return nil
	}
	masters := map[string]bool{}
	for i := 0; len(masters) < 3 && i < 100; i++ {
		key := fmt.Sprintf("{t%d}:k", i)
		m := c.MasterFor(t, key)
		if masters[m.Addr] {
			continue
		}
		masters[m.Addr] = true
		if err := w.Run(ctx, rdb, "x", script, []string{key}, "v").Err(); err != nil {
			t.Fatalf("run on %s: %v", m.Addr, err)
		}
		replica := replicaOf(m)
		pipe := replica.Client(t).Pipeline()
		pipe.Do(ctx, "readonly")
		get := pipe.Get(ctx, key)
		if _, err := pipe.Exec(ctx); err != nil || get.Val() != "v" {
			t.Errorf("the replica %s of %s has %s = %q (%v) right after Run", replica.Addr, m.Addr, key, get.Val(), err)
		}
	}
	if len(masters) != 3 {
		t.Fatalf("keys reached %d masters", len(masters))
	}
	if n := w.Short("x"); n != 0 {
		t.Errorf("%d WAITs came back short, want 0", n)
	}

	t.Run("slot moved", func(t *testing.T) {
		// A client with go-redis's default reload interval (a minute)
		// keeps its map after the move, so its master for the key is the
		// old one, which answers MOVED.
		cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: c.Addrs})
		defer cc.Close()
		const key = "{moved}:k"
		from := c.MasterFor(t, key)
		if node, err := cc.MasterForKey(ctx, key); err != nil || node.Options().Addr != from.Addr {
			t.Fatalf("the client's master for %s: %v %v, want %s", key, node, err, from.Addr)
		}
		to := c.Masters[0]
		if to == from {
			to = c.Masters[1]
		}
		moveSlot(t, c, key, from, to)

		if err := w.Run(ctx, cc, "moved", script, []string{key}, "v").Err(); err != nil {
			t.Fatalf("run after the move: %v", err)
		}
		if v, err := to.Client(t).Get(ctx, key).Result(); err != nil || v != "v" {
			t.Errorf("the new master %s has %s = %q (%v)", to.Addr, key, v, err)
		}
		if n := w.Short("moved"); n != 1 {
			t.Errorf("%d short WAITs after the redirect, want 1 (the one without a WAIT)", n)
		}
		// The redirect made the cluster client read the map again (in the
		// background): then the WAIT goes to the new master again.
		deadline := time.Now().Add(10 * time.Second)
		for {
			node, err := cc.MasterForKey(ctx, key)
			if err == nil && node.Options().Addr == to.Addr {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the cluster client still names %v (%v) for %s, want %s", node, err, key, to.Addr)
			}
			time.Sleep(20 * time.Millisecond)
		}
		if err := w.Run(ctx, cc, "moved", script, []string{key}, "w").Err(); err != nil {
			t.Fatalf("run after the reload: %v", err)
		}
		if n := w.Short("moved"); n != 1 {
			t.Errorf("%d short WAITs after the reload, want still 1", n)
		}
	})
}

// moveSlot moves key's empty slot from one master to another as redis-cli
// reshard does: importing and migrating, then the new owner on every
// master (the importing one first, so it takes a new config epoch).
func moveSlot(t *testing.T, c *redistest.Cluster, key string, from, to *redistest.Server) {
	t.Helper()
	ctx := context.Background()
	fc, tc := from.Client(t), to.Client(t)
	slot, err := fc.ClusterKeySlot(ctx, key).Result()
	if err != nil {
		t.Fatal(err)
	}
	fromID, err := fc.Do(ctx, "cluster", "myid").Text()
	if err != nil {
		t.Fatal(err)
	}
	toID, err := tc.Do(ctx, "cluster", "myid").Text()
	if err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		on   *redis.Client
		args []any
	}{
		{tc, []any{"cluster", "setslot", slot, "importing", fromID}},
		{fc, []any{"cluster", "setslot", slot, "migrating", toID}},
		{tc, []any{"cluster", "setslot", slot, "node", toID}},
		{fc, []any{"cluster", "setslot", slot, "node", toID}},
	}
	for _, m := range c.Masters {
		if m != from && m != to {
			steps = append(steps, struct {
				on   *redis.Client
				args []any
			}{m.Client(t), []any{"cluster", "setslot", slot, "node", toID}})
		}
	}
	for _, s := range steps {
		if err := s.on.Do(ctx, s.args...).Err(); err != nil {
			t.Fatalf("%v on %s: %v", s.args, s.on.Options().Addr, err)
		}
	}
	if got := c.MasterFor(t, key); got != to {
		t.Fatalf("after the move %s serves %s, want %s", got.Addr, key, to.Addr)
	}
}
