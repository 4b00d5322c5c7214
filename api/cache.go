package api

import (
	"bytes"
	"context"

	"github.com/sluice-dev/sluice/cachekey"
	"github.com/sluice-dev/sluice/estimate"
	"github.com/sluice-dev/sluice/scheduler"
)

// cachePrefixes finds the prompt-cache breakpoints of the request and sizes
// each cacheable prefix the way the job's whole input is estimated (the
// model's calibration ratio and margin), so that the scheduler can reserve
// only the uncached part once the upstream holds a prefix. input is the
// job's input estimate: no prefix counts as much as all of it. A request
// the upstream would refuse for its cache_control (more than four
// breakpoints, an unknown type or ttl) is refused here, with the reason.
func (s *Server) cachePrefixes(ctx context.Context, req *createRequest, input int) ([]scheduler.CachePrefix, error) {
	if !bytes.Contains(req.Request, []byte(`"cache_control"`)) {
		return nil, nil
	}
	ps, err := cachekey.Parse(req.Model, req.Request, estimate.Fragment)
	if err != nil {
		return nil, invalid("request", "%s", err.Error())
	}
	ratio := s.d.Estimator.Ratio(ctx, req.Model)
	var out []scheduler.CachePrefix
	for _, p := range ps {
		if !p.Cacheable {
			continue
		}
		n := min(estimate.Calibrated(p.Tokens, ratio, estimate.Margin), input-1)
		if n <= 0 {
			continue
		}
		out = append(out, scheduler.CachePrefix{Hash: p.Hash, Tokens: n, TTL: p.TTL})
	}
	return out, nil
}
