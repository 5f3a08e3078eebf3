package serve

import (
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// startDoor serves c through a door whose clients name themselves in a
// header: what is tested here is what the door does with an identity, not
// how one is proved (the e2e tests prove them with real certificates and
// tokens).
func startDoor(t *testing.T, c *Cache) *testServer {
	t.Helper()
	auth := AuthenticatorFunc(func(r *http.Request) (Identity, error) {
		switch r.Header.Get("Test-Client") {
		case "":
			return Identity{}, ErrNoCredentials
		case "reader":
			return Identity{Name: "r1", Door: "test", Role: Read}, nil
		case "writer":
			return Identity{Name: "w1", Door: "test", Role: Write}, nil
		}
		return Identity{}, errors.New("unknown client")
	})
	return serveOnLoopback(t, c.NewDoorServer(auth, nil, nil), "door")
}

func TestDoorServesEachRequestInItsClientsRole(t *testing.T) {
	tc := newTestCache(t, nil)
	door := startDoor(t, tc.Cache)
	hash := strings.Repeat("a", 32)
	content := []byte("a nar")
	nar := narName(content, "")
	info := narInfo(hash, "door", nar)
	for _, step := range []struct {
		name, client, method, path, body string
		want                             int
	}{
		{"no credentials", "", "GET", "/nix-cache-info", "", 401},
		{"bad credentials", "mallory", "GET", "/nix-cache-info", "", 401},
		{"reader reads", "reader", "GET", "/nix-cache-info", "", 200},
		{"reader may not upload", "reader", "PUT", "/" + nar, string(content), 405},
		{"reader may not root", "reader", "PUT", "/gcroots/x", "", 405},
		{"stranger may not upload", "", "PUT", "/" + nar, string(content), 401},
		{"nothing was stored", "reader", "GET", "/" + nar, "", 404},
		{"writer uploads the NAR", "writer", "PUT", "/" + nar, string(content), 201},
		{"writer uploads the narinfo", "writer", "PUT", "/" + hash + ".narinfo", info, 201},
		{"reader gets the narinfo", "reader", "GET", "/" + hash + ".narinfo", "", 200},
		{"reader may not forget", "reader", "DELETE", "/" + hash + ".narinfo", "", 405},
		{"stranger may not read", "", "GET", "/" + hash + ".narinfo", "", 401},
	} {
		t.Run(step.name, func(t *testing.T) {
			var body []byte
			if step.method == "PUT" {
				body = []byte(step.body)
			}
			var hdr []string
			if step.client != "" {
				hdr = []string{"Test-Client", step.client}
			}
			resp, got := do(t, door, step.method, step.path, body, hdr...)
			if resp.StatusCode != step.want {
				t.Fatalf("%s %s as %q: %d %q, want %d", step.method, step.path, step.client, resp.StatusCode, got, step.want)
			}
			if step.want == 401 && !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Basic ") {
				t.Errorf("a 401 without a Basic challenge (%q): curl would not send netrc credentials", resp.Header.Get("WWW-Authenticate"))
			}
			if step.want >= 400 && strings.TrimSpace(got) == "" {
				t.Errorf("refusal %d says nothing", step.want)
			}
		})
	}
	tc.durable.barrier()
	if _, err := os.Stat(filepath.Join(tc.dir, hash+".narinfo")); err != nil {
		t.Errorf("the writer's narinfo is not in the cache directory: %v", err)
	}
	tc.checkNothingLeaked(t)
}
