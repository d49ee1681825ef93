"""The warp renderer: mediapipe's face mesh warped onto the identity (warp, mesh, raster,
geometry), with what a warp cannot show filled in (mouth, eyes, paint, memory). Arrays in,
arrays out; imports only engines.landmarks beside itself."""
