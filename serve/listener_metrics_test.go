package serve

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestConnectionsRefusedPastTheCapAreCounted fills a listener's cap with
// connections in the middle of a request head (none idle, so none is
// closed to make room), and counts the connections refused past it, by
// role; the other role's count stays 0.
func TestConnectionsRefusedPastTheCapAreCounted(t *testing.T) {
	for _, tt := range []struct {
		role    Role
		refused int
	}{
		{Read, 1},
		{Write, 3},
	} {
		t.Run(tt.role.String(), func(t *testing.T) {
			tc, reg := metricsCache(t)
			srv := capped(t, tc, tt.role, 2)
			for range 2 {
				dial(t, srv, "GET /nix-cache-info HTTP/1.1\r\n")
			}
			time.Sleep(300 * time.Millisecond) // the server reads their first bytes
			for i := range tt.refused {
				resp, body, err := roundTrip(dial(t, srv, ""), getInfo)
				if err != nil || !strings.Contains(body, "too many connections") {
					t.Fatalf("connection %d past the cap: %v %v %q, want a refusal", i+1, resp, err, body)
				}
			}
			other := Write
			if tt.role == Write {
				other = Read
			}
			m := scrape(t, reg)
			for role, want := range map[Role]float64{tt.role: float64(tt.refused), other: 0} {
				name := fmt.Sprintf("kiss_onion_connections_refused_total{role=%s}", role)
				if got, ok := m[name]; !ok || got != want {
					t.Errorf("%s = %v (exported: %v), want %v", name, got, ok, want)
				}
			}
			// Within the cap nothing more is counted.
			srv2 := capped(t, tc, tt.role, 2)
			c := dial(t, srv2, "")
			if resp, _, err := roundTrip(c, getInfo); err != nil || resp.StatusCode != 200 {
				t.Fatalf("within the cap: %v %v", resp, err)
			}
			if got := scrape(t, reg)[fmt.Sprintf("kiss_onion_connections_refused_total{role=%s}", tt.role)]; got != float64(tt.refused) {
				t.Errorf("after a connection within the cap: %v refused, want still %d", got, tt.refused)
			}
		})
	}
}
