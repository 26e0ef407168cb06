"""The client's side: what a node is (its device) and how its errors reach the server."""
