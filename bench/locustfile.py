"""Load test of the demo shop's frontend (meshpy.shop), with locust.

Shoppers browse much more than they buy: each simulated user, with its own cart session,
mostly loads the index and product pages, sometimes adds to its cart and now and then checks
out; one checkout in twenty uses a card that gets declined (402), which is the expected answer
there and counted as a success under its own name.

Run headless (locust comes with ``pip install 'meshpy[load]'``)::

    locust -f bench/locustfile.py --headless -u 200 -r 50 -t 60s --host http://127.0.0.1:PORT

or with the web UI on http://localhost:8089::

    locust -f bench/locustfile.py --host http://127.0.0.1:PORT

``--host`` defaults to http://127.0.0.1:8080, the entry of ``meshpy demo``: its ingress sidecar
is an HTTP proxy into the mesh that picks the service by the Host header, so every request
says ``Host: frontend``. The frontend app itself ignores the Host header, so the same file
measures it directly (PORT: the app's). Set ``MESHPY_SHOP_HOST`` to name the frontend
otherwise (``frontend.shop``), or to an empty string to send the ``--host`` URL's own.

``python -m bench.locust_run --demo`` starts the demo, runs this file against it and prints
the mesh's own view of the same run beside locust's.
"""

from __future__ import annotations

import os
import random
import uuid

from locust import FastHttpUser, between, task

GOOD_CARD = "4242424242424242"
DECLINED_CARD = "4000000000000002"
DECLINED_SHARE = 0.05
# The service the demo's ingress routes to, by the Host header.
SHOP_HOST = os.environ.get("MESHPY_SHOP_HOST", "frontend")


class Shopper(FastHttpUser):
    host = "http://127.0.0.1:8080"
    wait_time = between(0.1, 0.5)
    default_headers = {"Host": SHOP_HOST} if SHOP_HOST else None

    def on_start(self) -> None:
        self.session = uuid.uuid4().hex
        self.product_ids: list[int] = []
        self.cart_size = 0
        self.browse_index()

    @task(6)
    def browse_index(self) -> None:
        response = self.client.get("/")
        if response.status_code == 200:
            # Remember what is in stock, as a shopper sees it on the page.
            products = response.json()["products"]
            self.product_ids = [p["id"] for p in products if p["stock"] > 0]

    @task(4)
    def view_product(self) -> None:
        if self.product_ids:
            self.client.get(f"/products/{random.choice(self.product_ids)}", name="/products/[id]")

    @task(3)
    def add_to_cart(self) -> None:
        if not self.product_ids:
            return
        item = {"id": random.choice(self.product_ids), "qty": random.randint(1, 3)}
        response = self.client.post(
            f"/cart/{self.session}/items", json=item, name="/cart/[session]/items"
        )
        if response.status_code == 200:
            self.cart_size += 1

    @task(1)
    def checkout(self) -> None:
        if self.cart_size == 0:
            self.add_to_cart()
            return
        declined = random.random() < DECLINED_SHARE
        name = "/cart/[session]/checkout" + (" (declined card)" if declined else "")
        card = DECLINED_CARD if declined else GOOD_CARD
        with self.client.post(
            f"/cart/{self.session}/checkout", json={"card": card}, name=name, catch_response=True
        ) as response:
            if response.status_code == 200 and not declined:
                self.cart_size = 0
            elif response.status_code == 402 and declined:
                response.success()  # the cart stays; a later checkout pays with a good card
            elif response.status_code == 409:
                # The limited item sold out: a real answer, not an error. Abandon this cart.
                response.success()
                self.session, self.cart_size = uuid.uuid4().hex, 0
            else:
                response.failure(f"{response.status_code}: {response.text[:200]}")
