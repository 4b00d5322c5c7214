package scheduler

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/redis/go-redis/v9"
)

// PointIdempotency makes an Idempotency-Key of group g name job id, which
// was admitted in another group (a model fallback) under the same key and
// body hash, unless the key already names a job there. A retry of the
// request is then answered by g's own admission with that job (replay),
// or refused as a conflict for another body, whichever group takes it
// now. The key lives as long as one written by admission.
//
// When the key already names another job of the same body (a retry that
// was admitted in g while this request was falling back), that job's id
// is returned: the request then has two jobs, and the caller keeps that
// one. Otherwise other is "".
func (s *Scheduler) PointIdempotency(ctx context.Context, g, tenant, user, key, id, bodyHash string) (other string, err error) {
	if key == "" {
		return "", nil
	}
	k := idempotencyKey(g, tenant, user, key)
	set, err := s.rdb.SetNX(ctx, k, id+"|"+bodyHash, IdempotencyTTL).Result()
	if err == nil && !set {
		var prev string
		if prev, err = s.rdb.Get(ctx, k).Result(); err == nil {
			if pid, phash, ok := strings.Cut(prev, "|"); ok && phash == bodyHash && pid != id {
				return pid, nil
			}
			return "", nil
		}
		if errors.Is(err, redis.Nil) { // expired in between: nothing to keep
			return "", nil
		}
	}
	if err != nil {
		return "", fmt.Errorf("scheduler: idempotency key of %s in %s: %w", id, g, err)
	}
	return "", nil
}
